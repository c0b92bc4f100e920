"""Matmuls with float32 results from half-precision inputs (tensor cores, no upcast copies)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _cuda_has_out_dtype() -> bool:
    """Whether this build's CUDA matmuls accept ``out_dtype=torch.float32`` for bf16 inputs."""
    try:
        a = torch.ones(1, 2, 2, dtype=torch.bfloat16, device="cuda")
        return (torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
                and torch.mm(a[0], a[0], out_dtype=torch.float32).dtype == torch.float32)
    except (TypeError, RuntimeError):
        return False


def is_half(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


def bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched or not) with a float32 result; half-precision inputs stay in their
    dtype on a GPU (float32 accumulation in the GEMM, float32 output where the build supports
    ``out_dtype``, else the half-precision output is widened) and are widened on a CPU."""
    if not (is_half(a) or is_half(b)):
        return torch.matmul(a.float(), b.float()) if a.dtype != b.dtype else torch.matmul(a, b)
    if a.is_cuda:
        a, b = a.to(b.dtype) if is_half(b) else a, b.to(a.dtype) if is_half(a) else b
        if _cuda_has_out_dtype():
            op = torch.bmm if a.dim() == 3 else torch.mm
            return op(a, b, out_dtype=torch.float32)
        return torch.matmul(a, b).float()
    return torch.matmul(a.float(), b.float())


def addmm_f32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out = a @ b`` (``first``) or ``out += a @ b`` for a float32 ``out``, without a
    temporary when the inputs are float32 too."""
    if a.dtype == b.dtype == out.dtype:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif first:
        out.copy_(bmm_f32(a, b))
    else:
        out += bmm_f32(a, b)
