"""The tree is formatted and lint-clean (``ruff.toml``): fix with ``ruff format . && ruff check --fix .``."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ruff(*args):
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)


def test_tree_is_formatted():
    out = _ruff("format", "--check", ".")
    assert out.returncode == 0, "run `ruff format .`:\n" + out.stdout + out.stderr


def test_tree_is_lint_clean():
    out = _ruff("check", "--output-format", "concise", ".")
    assert out.returncode == 0, "run `ruff check --fix .`:\n" + out.stdout + out.stderr
