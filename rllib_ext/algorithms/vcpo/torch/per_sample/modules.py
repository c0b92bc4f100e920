"""Module probing: which modules hold trainable parameters, of which supported kind."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


class UnsupportedModuleError(TypeError):
    """A module holds trainable parameters whose per-sample gradients we cannot compute exactly."""


@dataclasses.dataclass
class Hooked:
    name: str
    module: nn.Module
    kind: str  # "linear" | "embedding" | "scale"
    weight: nn.Parameter | None  # None when frozen
    bias: nn.Parameter | None


@dataclasses.dataclass
class Call:
    """One forward call of a hooked module, as the capture recorded it."""

    hooked: Hooked
    input: torch.Tensor
    output: torch.Tensor
    input_version: int
    output_version: int


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return params


def trainable(module: nn.Module, name: str) -> nn.Parameter | None:
    p = module._parameters.get(name)
    return p if p is not None and p.requires_grad else None


def is_elementwise_affine(module: nn.Module) -> bool:
    """Whether ``module(x) == weight * module_{weight=1, bias=0}(x) + bias`` (numerical probe)."""
    weight = module._parameters.get("weight")
    bias = module._parameters.get("bias")
    names = {n for n, p in module._parameters.items() if p is not None}
    if weight is None or weight.dim() != 1 or not names <= {"weight", "bias"}:
        return False
    if bias is not None and bias.shape != weight.shape:
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    kw = {"dtype": weight.dtype}
    x = torch.randn(2, 3, weight.shape[0], generator=g, **kw).to(weight.device)
    w = (torch.rand(weight.shape, generator=g, **kw) + 0.5).to(weight.device)
    b = torch.randn(weight.shape, generator=g, **kw).to(weight.device) if bias is not None else None
    with torch.no_grad():
        try:
            y = torch.func.functional_call(module, affine_params(w, b), (x,))
            h = unit_affine_output(module, x)
        except Exception:  # noqa: BLE001 - any failure means "not this kind of module"
            return False
    want = w * h + (b if b is not None else 0)
    tol = 1e-2 if weight.element_size() < 4 else 1e-5
    return y.shape == x.shape and torch.allclose(y, want, rtol=tol, atol=tol)


def affine_params(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


def unit_affine_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``h(x)`` of ``y = weight * h(x) + bias``: the module run with weight 1 and bias 0."""
    weight, bias = module._parameters["weight"], module._parameters.get("bias")
    ones = torch.ones_like(weight)
    zeros = torch.zeros_like(bias) if bias is not None else None
    return torch.func.functional_call(module, affine_params(ones, zeros), (x,))


def classify(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UnsupportedModuleError(
                f"module {name!r} ({kind}) uses max_norm / scale_grad_by_freq / sparse, which "
                "per-sample gradients do not support; use the loop route instead"
            )
        return "embedding"
    if is_elementwise_affine(module):
        return "scale"
    trainable_names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    raise UnsupportedModuleError(
        f"module {name!r} of type {kind} holds trainable parameters {trainable_names} whose "
        "per-sample gradients PerSampleGradients cannot compute exactly (supported: "
        "nn.Linear, nn.Embedding, elementwise-affine norms y = weight * h(x) + bias); freeze "
        "them (requires_grad=False) or use the loop route (opob.score_grad_sq_norms_loop / "
        "opob.loop_accumulate)"
    )


def hook_modules(model: nn.Module) -> list[Hooked]:
    """Every module holding trainable parameters, classified; every trainable parameter must be
    some supported module's weight or bias."""
    names = {id(p): n for n, p in trainable_named_parameters(model)}
    hooked, covered = [], set()
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        entry = Hooked(name, module, classify(name, module), trainable(module, "weight"),
                       trainable(module, "bias"))
        hooked.append(entry)
        covered.update(id(p) for p in (entry.weight, entry.bias) if p is not None)
    missing = [n for i, n in names.items() if i not in covered]
    if missing:  # e.g. a trainable parameter registered under another name than weight/bias
        raise UnsupportedModuleError(
            f"trainable parameters {missing} are not covered by a supported module's "
            "weight or bias"
        )
    return hooked
