"""What moving memory costs relative to arithmetic on a device: the route planners' constant.

``memory_cost(device, nbytes)`` is the number of floating-point operations that take as long as
moving one element of an ``nbytes`` tensor through memory. On a CPU two measured constants:
8 for tensors that stay in cache (up to 2 MiB; the per-sample routes were tuned with it on the
tiny model), 40 beyond (one thread of this project's 2-core x86 machine: 52 GFLOP/s in a
float32 matmul, 1.3-1.5 G elements/s in a 16-64 MiB copy). On a GPU it is calibrated once per
process and device by timing a large half-precision matmul against a large copy (about
0.1 s): tensor cores make arithmetic 100-500x cheaper than memory traffic there, and a
CPU-tuned constant picks memory-bound routes that are several times slower (measured on an
H200 in issue 11). Only the order of magnitude matters for the route choices.
"""

from __future__ import annotations

import functools
import time

import torch

CPU_MEMORY_COST = 8.0  # tensors that stay in cache
CPU_MEMORY_COST_BEYOND_CACHE = 40.0
CPU_CACHE_BYTES = 2 << 20


def memory_cost(device: torch.device | str, nbytes: int = CPU_CACHE_BYTES) -> float:
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_MEMORY_COST if nbytes <= CPU_CACHE_BYTES else CPU_MEMORY_COST_BEYOND_CACHE
    return _calibrated_cuda(device.index if device.index is not None
                            else torch.cuda.current_device())


@functools.cache
def _calibrated_cuda(index: int) -> float:
    device = torch.device("cuda", index)
    size, elements = 4096, 1 << 27
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    src = torch.empty(elements, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)

    def timed(fn, repeats: int = 5) -> float:
        fn()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats

    flops_per_s = 2 * size ** 3 / timed(lambda: a @ a)
    # a copy reads and writes every element
    elements_per_s = 2 * elements / timed(lambda: dst.copy_(src))
    return max(1.0, flops_per_s / elements_per_s)
