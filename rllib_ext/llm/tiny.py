"""The embedded default model: a tiny Llama with a character-level tokenizer.

Nothing can be downloaded on the machines this project must run on, so the project builds its
own model: a 2-layer Llama (hidden 128, head_dim 64 — vLLM's CPU attention rejects head_dim 16 —
float32) over a 100-symbol character vocabulary (4 specials + printable ASCII). This module
holds its architecture, tokenizer and cache location; the build (a warm start on the embedded
arithmetic task, which is the math env's) is :mod:`rllib_ext.tiny_build`, above both packages:

    python -m rllib_ext.tiny_build            # build (or reuse) the cached default
    python -m rllib_ext.tiny_build --force    # rebuild
    python -m rllib_ext.tiny_build --path     # print where it is

The saved directory is a normal Hugging Face model directory that transformers and vLLM load.
Everywhere a model is named (configs, CLI), ``"tiny"`` means this model; any other value is a
local directory or a Hugging Face hub id, handled the same way by :func:`resolve_model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

TINY_MODEL_NAME = "tiny"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
# Printable ASCII minus the whitespace controls a prompt never needs.
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
BUILD_INFO_FILE = "rllib_ext_build.json"
# The embedded task: a+b with a, b in 0..29; a fifth of the pairs are held out for evaluation.
TINY_ARITHMETIC_DATASET = {"name": "arithmetic", "min_operand": 0, "max_operand": 29, "ops": "+",
                           "test_fraction": 0.2}


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines the built model (its hash names the cache directory)."""

    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 64
    max_positions: int = 128
    # The warm-start task: the embedded arithmetic dataset with these knobs.
    dataset: dict = field(default_factory=lambda: dict(TINY_ARITHMETIC_DATASET))
    batch_size: int = 64
    lr: float = 1e-3
    max_steps: int = 1500
    eval_every: int = 25
    target_accuracy: float = 0.3

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def cache_root() -> Path:
    """``$RLLIB_EXT_CACHE`` or ``~/.cache/rllib-ext``."""
    return Path(os.environ.get("RLLIB_EXT_CACHE", Path.home() / ".cache" / "rllib-ext"))


def tiny_model_dir(spec: TinyModelSpec = TinyModelSpec()) -> Path:
    return cache_root() / "models" / f"tiny-arith-{spec.digest()}"


def build_char_tokenizer(vocab_size: int | None = None):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, ``<bos>``
    prepended, tokens fused back without separators when decoding. ``vocab_size`` pads the
    vocabulary with word tokens ``<w0>``, ``<w1>``, ... that text never encodes to (a model
    with a larger output layer, e.g. the generation benchmark's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    vocab.update({f"<w{i}>": len(vocab) + i for i in range(max(0, (vocab_size or 0) - len(vocab)))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def build_untrained_model(spec: TinyModelSpec, vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_positions,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False, dtype="float32")
    return LlamaForCausalLM(config)


def resolve_model(name_or_path: str) -> str:
    """``"tiny"`` -> the cached tiny model directory (the algorithms and the `rllib` command
    build it before anything loads it); an existing local directory -> itself; anything else
    is passed on as a Hugging Face hub id."""
    if name_or_path == TINY_MODEL_NAME:
        target = tiny_model_dir()
        if not (target / BUILD_INFO_FILE).exists():
            raise ValueError(f"the embedded model 'tiny' is not built yet ({target}). Fix: run "
                             "`python -m rllib_ext.tiny_build` (`make demo` does).")
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ValueError(f"model directory '{path}' has no config.json. Fix: point `model` "
                             "at a Hugging Face model directory, a hub id, or 'tiny'.")
        return str(path.resolve())
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"model directory '{name_or_path}' does not exist. Fix: correct the "
                         "path, or give a Hugging Face hub id ('org/name') or 'tiny'.")
    return name_or_path
