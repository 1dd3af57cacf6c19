"""The README's examples run as written."""
import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(marker: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    after = text.split(f"<!-- readme-example: {marker} -->", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_training_loop_example_samples_while_collecting():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_block("training-loop"), "README.md", "exec"), {})
    assert out.getvalue().strip().splitlines()[-1] == "True"


def test_thirty_second_demo():
    code = readme_block("demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert "batch_size=torch.Size([200])" in out.getvalue()
