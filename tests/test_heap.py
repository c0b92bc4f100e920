"""The CPU learner's heap policy: freed memory stays in the process, so re-allocating it does
not page-fault it in again."""

import os
import subprocess
import sys

import pytest

from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig
from rllib_ext.utils.heap import _glibc, keep_freed_heap

# A learner-like step: 20 blocks of 2 MiB alive at once, written, all freed at the end (C
# malloc directly, so that no other allocation lands above them); prints the page faults of
# 10 steps after 3 warm-up steps.
STEPS = """
import ctypes, resource, sys
from rllib_ext.utils.heap import keep_freed_heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_heap(512 << 20)
def step():
    blocks = [libc.malloc(2 << 20) for _ in range(20)]
    for block in blocks:
        ctypes.memset(block, 1, 2 << 20)
    for block in reversed(blocks):
        libc.free(block)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(_glibc() is None, reason="the heap policy is glibc's")
def test_kept_heap_is_not_faulted_in_again():
    # Plain glibc: a process started after a vLLM CPU engine inherits the LD_PRELOAD it
    # exports (libgomp, and tcmalloc where vLLM bundles it, which keeps freed memory anyway).
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", STEPS, mode], check=True, env=env,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "keep")}
    # glibc's default trims the freed 40 MiB, and each step faults its 10k pages in again
    assert faults["default"] >= 10 * 5000
    assert faults["keep"] < faults["default"] / 100


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
