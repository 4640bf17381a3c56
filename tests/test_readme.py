"""The README's "Using it" example runs and prints what the README shows.

Losses and flip ratios are compared within a small tolerance (another CPU's BLAS may round the last
digit differently); the compression is exact.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
LINE = re.compile(r"step (\d+): loss ([\d.]+), weights flipped ([\d.]+)%")


def _using_it() -> tuple[str, str]:
    section = README.read_text().split("## Using it", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("prints", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    return code, shown


@pytest.mark.slow
def test_readme_example_prints_what_the_readme_shows(tmp_path):
    code, shown = _using_it()
    script = tmp_path / "example.py"
    script.write_text(code)
    printed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    got, want = LINE.findall(printed), LINE.findall(shown)
    assert len(want) == 5 and [g[0] for g in got] == [w[0] for w in want], printed
    for (_, loss, flipped), (_, want_loss, want_flipped) in zip(got, want):
        assert abs(float(loss) - float(want_loss)) <= 0.01, printed
        assert abs(float(flipped) - float(want_flipped)) <= 0.05, printed
    assert printed.splitlines()[-1] == shown.strip().splitlines()[-1]


def _inference_example() -> str:
    section = README.read_text().split("### Inference: convert, fold, export", 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_inference_example_runs(tmp_path):
    """The inference example converts, folds, saves and exports, and its equality asserts hold."""
    script = tmp_path / "inference.py"
    script.write_text(_inference_example())
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "converted and folded outputs equal the trained model's" in run.stdout
    assert (tmp_path / "binarynet.pt").exists() and (tmp_path / "binarynet_folded.pt2").exists()
