"""The CPU learner's heap policy: freed memory stays in the process, so re-allocating it does
not page-fault it in again."""

import os
import subprocess
import sys

import pytest

from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig
from rllib_ext.utils.heap import _glibc, keep_freed_heap

# A learner-like step: many 2 MiB blocks alive at once, all freed at the end; the fault count
# of 10 steps after 3 warm-up steps is printed.
STEPS = """
import resource, sys, torch
from rllib_ext.utils.heap import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap(512 << 20)
def step():
    blocks = [torch.ones(1 << 19) for _ in range(20)]
    del blocks
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(_glibc() is None, reason="the heap policy is glibc's")
def test_kept_heap_is_not_faulted_in_again():
    # glibc's malloc: a process started after a vLLM CPU engine inherits its LD_PRELOAD
    # of tcmalloc, which keeps freed memory anyway.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", STEPS, mode], check=True, env=env,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "keep")}
    # 40 MiB returned and faulted in again per step: 10k pages, or 20 where transparent huge
    # pages back the heap
    assert faults["default"] >= 10 * 20
    assert faults["keep"] < faults["default"] / 20


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="keep_bytes must be in"):
        keep_freed_heap(0)
    with pytest.raises(ValueError, match="keep_bytes must be in"):
        keep_freed_heap(1 << 31)


@pytest.mark.parametrize("value", [-1, 2048, 1.5, "512"])
def test_config_names_the_field_and_its_range(value):
    config = VCPOConfig().environment("MathEnv").training(learner_heap_keep_mb=value)
    with pytest.raises(ValueError, match=r"learner_heap_keep_mb must be an integer in \[0, 2047\]"):
        config.validate()
