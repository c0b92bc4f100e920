"""Buffers reused across steps, and what the layers of one backward share."""

from __future__ import annotations

import dataclasses
import math

import torch

from rllib_ext.algorithms.vcpo.torch.per_sample.precision import bmm_f32


def tensor_key(x: torch.Tensor) -> tuple:
    """Identifies a tensor view (same memory, shape and strides) while it is alive."""
    return x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype


@dataclasses.dataclass(frozen=True)
class LiveRows:
    """Rows ``(b, t)`` of ``[B, L, ...]`` factors: flat ``index = b * L + t`` and ``sample = b``."""

    index: torch.Tensor
    sample: torch.Tensor


class Workspace:
    """Buffers kept across steps (so a step does not pay for fresh memory) and, within one
    backward pass, what several layers share: Gram matrices and live rows of a layer input
    (q/k/v and gate/up read the same input)."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._buffers: dict[str, torch.Tensor] = {}
        self._grams: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._live_rows: list[tuple[torch.Tensor, int, LiveRows]] = []
        self._inputs: dict[tuple, torch.Tensor] = {}

    def buffer(self, key: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements (at least ``chunk_bytes`` for the
        chunk scratch ``key="chunk"``); one that grows gets 25% headroom, as sizes that
        depend on the data (live rows) vary from step to step."""
        if key == "chunk":
            numel = max(numel, self.chunk_bytes // like.element_size())
        buf = self._buffers.get(key)
        if buf is not None and (buf.dtype != like.dtype or buf.device != like.device):
            buf = None
        if buf is None or buf.numel() < numel:
            if buf is not None:
                numel += numel // 4
            buf = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """``x x^T`` per sample, ``[B, L, L]`` float32, computed once per distinct tensor."""
        key = tensor_key(x)
        if key not in self._grams:  # x is kept too, so its memory cannot be reused meanwhile
            self._grams[key] = (x, bmm_f32(x, x.transpose(1, 2)))
        return self._grams[key][1]

    def live_rows(self, live: torch.Tensor, length: int) -> LiveRows:
        """The rows a ``[B, active]`` live mask keeps of ``[B, length, ...]`` factors (layers
        whose masks are equal share one object, so their inputs are gathered once)."""
        for mask, mask_length, rows in self._live_rows:
            if mask_length == length and mask.shape == live.shape and torch.equal(mask, live):
                return rows
        sample, position = live.nonzero(as_tuple=True)
        rows = LiveRows(sample * length + position, sample)
        self._live_rows.append((live, length, rows))
        return rows

    def gather(self, key: str, x: torch.Tensor, rows: LiveRows) -> torch.Tensor:
        """``x``'s rows ``rows.index`` of its ``[B * L, ...]`` flattening, in buffer ``key``."""
        flat = x.reshape(x.shape[0] * x.shape[1], -1) if x.dim() > 2 else x.reshape(-1)
        shape = (rows.index.numel(), *flat.shape[1:])
        out = self.buffer(key, math.prod(shape), flat)[: math.prod(shape)].view(shape)
        return torch.index_select(flat, 0, rows.index, out=out)

    def gather_input(self, key: str, x: torch.Tensor, rows: LiveRows) -> torch.Tensor:
        """:meth:`gather` once per (input, rows) in a backward pass (``key`` names the buffer
        of the first layer asking)."""
        cache_key = (tensor_key(x), id(rows))
        if cache_key not in self._inputs:
            self._inputs[cache_key] = self.gather(key, x, rows)
        return self._inputs[cache_key]

    def end_backward(self) -> None:
        self._grams.clear()
        self._live_rows.clear()
        self._inputs.clear()

    def clear(self) -> None:
        self._buffers.clear()
        self.end_backward()


def scaled(x: torch.Tensor, per_row: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``c_k x_k`` in ``x``'s dtype (no upcast of activations); in place when allowed."""
    per_row = per_row.to(x.dtype)
    return x.mul_(per_row) if in_place else x * per_row
