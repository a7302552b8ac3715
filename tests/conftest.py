import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rlm_cli():
    """argv prefix that runs the CLI of this checkout in a fresh interpreter."""
    return [sys.executable, "-m", "rlm_train.cli"]
