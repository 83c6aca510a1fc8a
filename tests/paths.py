"""Where the tests find the repository's files, wherever the test file itself lives."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIG = REPO_ROOT / "config" / "paper.yaml"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
