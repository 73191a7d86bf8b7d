"""The whole repository is clean under the ruff settings in pyproject.toml (line length, quotes,
import order, pyflakes), so a style slip fails the test command rather than a later review."""
import subprocess
import sys

from helpers import REPO


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', str(REPO)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, (
        f'ruff check reports:\n{proc.stdout}{proc.stderr}\n'
        'Fix these, or run `ruff check --fix .` for the ones it can fix itself.')
