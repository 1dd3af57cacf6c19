"""``python -m collectors``: the CLI (see :mod:`collectors.cli`)."""
import sys

from collectors.cli import main

if __name__ == "__main__":  # (an importer, e.g. the docs builder, runs nothing)
    sys.exit(main())
