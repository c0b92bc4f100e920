"""The embedded default model: a tiny Llama with a character-level tokenizer.

Nothing can be downloaded on the machines this project must run on, so the project builds its
own model: a 2-layer Llama (hidden 128, head_dim 64 — vLLM's CPU attention rejects head_dim 16 —
float32) over a 100-symbol character vocabulary (4 specials + printable ASCII), warm-started
by supervised steps on the embedded arithmetic task (``a+b=`` -> ``c``) until its greedy
accuracy on held-out problems first reaches ``target_accuracy`` (default 0.3), which leaves RL
clear headroom. The build is deterministic for a seed and cached on disk; the saved directory is
a normal Hugging Face model directory that both transformers and vLLM load.

    python -m rllib_ext.llm.tiny build            # build (or reuse) the cached default
    python -m rllib_ext.llm.tiny build --force    # rebuild
    python -m rllib_ext.llm.tiny path             # print where it is

Everywhere a model is named (configs, CLI), ``"tiny"`` means this model; any other value is a
local directory or a Hugging Face hub id, handled the same way by :func:`resolve_model`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import string
import sys
import tempfile
import time
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


def encode_examples(tokenizer, problems, with_answers: bool):
    """Token ids of ``<bos>prompt[answer<eos>]`` and the index where the answer starts, for
    dataset rows with ``prompt`` and ``answer``."""
    rows = []
    for problem in problems:
        prompt = tokenizer(problem["prompt"]).input_ids
        answer = tokenizer(problem["answer"], add_special_tokens=False).input_ids + [EOS_ID] \
            if with_answers else []
        rows.append((prompt + answer, len(prompt)))
    return rows


def greedy_accuracy(model, tokenizer, problems, max_new_tokens: int = 6) -> float:
    """Fraction of problems whose greedy completion (up to ``<eos>``) equals the answer."""
    import torch

    from rllib_ext.llm.generation import left_pad

    prompts = [ids for ids, _ in encode_examples(tokenizer, problems, with_answers=False)]
    input_ids, attention_mask = left_pad(prompts, PAD_ID)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    texts = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    model.train()
    return sum(t.strip() == p["answer"] for t, p in zip(texts, problems)) / max(1, len(problems))


def warm_start(model, tokenizer, spec: TinyModelSpec, progress=None) -> dict:
    """Supervised steps on the answer tokens until held-out greedy accuracy first reaches
    ``spec.target_accuracy`` (checked every ``spec.eval_every`` steps) or ``spec.max_steps``."""
    import torch

    from envs.math.datasets import load_rows

    train = load_rows(spec.dataset, "train").rows
    test = load_rows(spec.dataset, "test").rows
    rows = encode_examples(tokenizer, train, with_answers=True)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    accuracy, step = greedy_accuracy(model, tokenizer, test), 0
    history = [(0, accuracy)]
    model.train()
    while accuracy < spec.target_accuracy and step < spec.max_steps:
        index = torch.randint(len(rows), (spec.batch_size,), generator=generator).tolist()
        batch = [rows[i] for i in index]
        length = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), length), PAD_ID)
        labels = torch.full((len(batch), length), -100)
        for row, (ids, answer_start) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, answer_start:len(ids)] = torch.tensor(ids[answer_start:])
        loss = model(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(),
                     labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % spec.eval_every == 0:
            accuracy = greedy_accuracy(model, tokenizer, test)
            history.append((step, accuracy))
            if progress:
                progress(step, loss.item(), accuracy)
    return {"steps": step, "heldout_greedy_accuracy": accuracy, "history": history,
            "num_train_problems": len(train), "num_test_problems": len(test)}


def build(spec: TinyModelSpec = TinyModelSpec(), force: bool = False, quiet: bool = False) -> Path:
    """Build the tiny model into its cache directory (or reuse it) and return the path.

    Concurrent builders (e.g. several test workers) are serialised by a file lock; the
    directory appears atomically (built in a temporary directory, then renamed).
    """
    import torch
    from filelock import FileLock

    target = tiny_model_dir(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / BUILD_INFO_FILE).exists() and not force:
            return target

        def report(step, loss, accuracy):
            if not quiet:
                print(f"  warm-start step {step}: loss {loss:.3f}, held-out greedy accuracy "
                      f"{accuracy:.1%}", file=sys.stderr, flush=True)

        if not quiet:
            print(f"building the tiny model into {target} (about a minute) ...", file=sys.stderr,
                  flush=True)
        started = time.time()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # bitwise-reproducible CPU reductions for a given seed
        try:
            tokenizer = build_char_tokenizer()
            model = build_untrained_model(spec, len(tokenizer))
            info = warm_start(model, tokenizer, spec, progress=report)
        finally:
            torch.set_num_threads(threads)
        info.update(spec=asdict(spec), build_seconds=round(time.time() - started, 1))
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        if not quiet:
            print(f"built in {info['build_seconds']} s: held-out greedy accuracy "
                  f"{info['heldout_greedy_accuracy']:.1%} after {info['steps']} steps",
                  file=sys.stderr, flush=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """``"tiny"`` -> the cached tiny model directory (built on first use); an existing local
    directory -> itself; anything else is passed on as a Hugging Face hub id."""
    if name_or_path == TINY_MODEL_NAME:
        return str(build())
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rllib_ext.llm.tiny",
                                     description="Build the embedded tiny model.")
    parser.add_argument("command", choices=["build", "path"])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(tiny_model_dir())
        return 0
    path = build(force=args.force)
    print(path)
    print(json.dumps({k: v for k, v in json.loads((path / BUILD_INFO_FILE).read_text()).items()
                      if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
