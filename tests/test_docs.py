"""The documentation tells the truth: its links resolve, every option and argument is
documented, and the site (guides and the API reference from the docstrings) builds strictly."""
import glob
import html
import inspect
import os
import re
import subprocess
import sys

from actors.options import CollectorOptions
from collectors import RayReplayBuffer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CHANGELOG.md"),
         *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def buffer_arguments() -> list[str]:
    return [n for n in inspect.signature(RayReplayBuffer).parameters if not n.startswith("_")]


def test_every_relative_link_in_the_readme_and_the_docs_resolves():
    checked = 0
    for page in PAGES:
        text = re.sub(r"```.*?```", "", open(page).read(), flags=re.S)  # code is not links
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the page
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), f"{os.path.relpath(page, ROOT)} links to {target}"
            checked += 1
    assert checked >= 20  # the README and the guides link to each other


def test_every_replay_buffer_argument_is_in_its_docstring():
    args = RayReplayBuffer.__doc__.split("Args:", 1)[1].split("Example:", 1)[0]
    documented = set(re.findall(r"^ {8}(\w+):", args, re.M))
    assert set(buffer_arguments()) - documented == set()


def test_the_readme_is_a_front_page():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(lines) <= 300, len(lines)
    assert lines[0] == "# ray-collectors"
    assert "bash scripts/run.sh" in lines[:20] and "bash scripts/test.sh" in lines[:20]


def test_the_site_builds_strictly_with_every_option_in_the_reference(tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    text = html.unescape(re.sub(r"<[^>]+>", " ", (site / "reference" / "index.html").read_text()))
    for name, field in CollectorOptions.model_fields.items():
        assert re.search(rf"\b{name}\b", text), f"option {name} is not in the API reference"
        assert field.description.split(";")[0][:40] in " ".join(text.split()), name
    for name in buffer_arguments():
        assert re.search(rf"\b{name}\b", text), f"RayReplayBuffer({name}=...) is not in the reference"
    for page in ("torchrl", "replay-buffer", "deployment", "monitoring", "failures", "training",
                 "performance", "architecture"):
        assert (site / page / "index.html").exists(), page
