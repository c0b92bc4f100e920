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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs it (ray.init costs 5-20 s)."""
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def tiny_model_path() -> str:
    """The embedded tiny model (built once, then cached on disk): tests that load "tiny"
    (a MathEnv's default tokenizer, runners built by hand) find it built, as the algorithms
    and the `rllib` command make sure it is."""
    from rllib_ext.tiny_build import build

    return str(build(quiet=True))


@pytest.fixture
def one_torch_thread():
    """Small ops: one torch thread (two threads on a loaded 2-core machine spin against each
    other and cost more than the math)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
