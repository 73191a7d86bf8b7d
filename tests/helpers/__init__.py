"""What several test modules share: synthetic weight files, image folders, the golden inputs
and a loopback HTTP server. Fixtures built on them live in tests/conftest.py."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository's root folder
