"""The embedded tiny model: deterministic build, loadable by transformers, modest accuracy."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rllib_ext import tiny_build
from rllib_ext.llm import tiny


def test_default_model_has_headroom_for_rl(tiny_model_path):
    info = json.loads((Path(tiny_model_path) / tiny.BUILD_INFO_FILE).read_text())
    assert 0.2 <= info["heldout_greedy_accuracy"] <= 0.4
    # The build stops at the first evaluation at or above the target.
    assert info["history"][-2][1] < tiny.TinyModelSpec().target_accuracy <= info["history"][-1][1]


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLIB_EXT_CACHE", str(tmp_path / "a"))
    spec = tiny.TinyModelSpec(max_steps=6, eval_every=3, target_accuracy=1.0)
    first = tiny_build.build(spec, quiet=True)
    mtime = (first / "model.safetensors").stat().st_mtime
    assert tiny_build.build(spec, quiet=True) == first  # cached: not rebuilt
    assert (first / "model.safetensors").stat().st_mtime == mtime
    monkeypatch.setenv("RLLIB_EXT_CACHE", str(tmp_path / "b"))
    second = tiny_build.build(spec, quiet=True)
    assert second != first
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    other_seed = tiny_build.build(tiny.TinyModelSpec(seed=1, max_steps=6, eval_every=3,
                                               target_accuracy=1.0), quiet=True)
    c = load_file(other_seed / "model.safetensors")
    assert any(not (a[k] == c[k]).all() for k in a)


def test_tokenizer_round_trip_and_model_loads(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = tokenizer("12+7= x\ny").input_ids
    assert ids[0] == tiny.BOS_ID and len(ids) == 1 + len("12+7= x\ny")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12+7= x\ny"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model.config.head_dim >= 32 and next(model.parameters()).dtype.is_floating_point
    assert tiny_build.greedy_accuracy(model, tokenizer, [tiny_problem("2+2=", "4")]) in (0.0, 1.0)


def tiny_problem(question, answer):
    return {"uid": "t/0", "prompt": question, "answer": answer}


def test_resolve_model(tmp_path, tiny_model_path):
    assert tiny.resolve_model("tiny") == tiny_model_path
    assert tiny.resolve_model(tiny_model_path) == tiny_model_path
    assert tiny.resolve_model("Qwen/Qwen2-1.5B-Instruct") == "Qwen/Qwen2-1.5B-Instruct"
    with pytest.raises(ValueError, match="has no config.json"):
        tiny.resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="model directory './no/such/model' does not exist"):
        tiny.resolve_model("./no/such/model")


def test_tiny_is_refused_until_built_with_the_command_that_builds_it(tmp_path, monkeypatch):
    """llm/ only finds the model (its build needs the math env's data, which llm/ does not
    import); the algorithms and the CLI build it first."""
    monkeypatch.setenv("RLLIB_EXT_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"'tiny' is not built yet .* `python -m "
                                         r"rllib_ext.tiny_build"):
        tiny.resolve_model("tiny")
    tiny_build.ensure_built("Qwen/Qwen2-0.5B")  # another model: nothing to build
    assert not any(tmp_path.iterdir())
