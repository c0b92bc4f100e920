import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RLLIB = str(Path(sys.executable).parent / "rllib")


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `rllib` program as a user would; returns the finished process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([RLLIB, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
