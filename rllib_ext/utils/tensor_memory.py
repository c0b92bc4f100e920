"""Peak memory of the tensors a block of PyTorch code creates, on any device (Ray-free).

``torch.cuda.max_memory_allocated`` exists only for GPUs; on a CPU the process's peak RSS mixes
in the allocator's caching and everything else the process holds. :class:`PeakTensorMemory`
counts the storages created inside the block that are alive at the same time (each storage
once, freed when its last tensor goes), which is what an implementation's memory use is.
It runs every op through Python, so use it for a measurement, not around timed code.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as m: ...``; then ``m.peak_bytes``."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.now_bytes = 0
        self.peak_bytes = 0

    def _free(self, key: int) -> None:
        self.now_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._live:
                    self._live[key] = storage.nbytes()
                    self.now_bytes += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.now_bytes)
                    weakref.finalize(storage, self._free, key)
        return out
