"""Builds the embedded tiny model (:mod:`rllib_ext.llm.tiny`): supervised steps on the embedded
arithmetic task (``a+b=`` -> ``c``, the math env's dataset and its train/test split) until the
greedy accuracy on held-out problems first reaches ``target_accuracy`` (default 0.3), which
leaves RL clear headroom. Deterministic for a seed; cached on disk under the spec's hash.

It sits above ``llm/`` and ``envs/`` (it needs the model of one and the data of the other);
VCPO and the `rllib` command call :func:`build` before anything loads ``"tiny"``.

    python -m rllib_ext.tiny_build            # build (or reuse) the cached default
    python -m rllib_ext.tiny_build --force    # rebuild
    python -m rllib_ext.tiny_build --path     # print where it is
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from envs.math.datasets import load_rows
from rllib_ext.llm.tiny import (
    BUILD_INFO_FILE,
    EOS_ID,
    PAD_ID,
    TINY_MODEL_NAME,
    TinyModelSpec,
    build_char_tokenizer,
    build_untrained_model,
    tiny_model_dir,
)


def ensure_built(model: str) -> None:
    """Build the tiny model if ``model`` names it (a no-op for any other model)."""
    if model == TINY_MODEL_NAME:
        build()


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


def build(spec: TinyModelSpec = TinyModelSpec(), force: bool = False,
          quiet: bool = False) -> Path:
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
        with _no_progress_bars():
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



@contextlib.contextmanager
def _no_progress_bars():
    """transformers' progress bars off (a one-file save draws one per call)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rllib_ext.tiny_build",
                                     description="Build the embedded tiny model (or reuse the "
                                                 "cached one) and print where it is.")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--path", action="store_true", help="only print where it goes")
    args = parser.parse_args(argv)
    if args.path:
        print(tiny_model_dir())
        return 0
    print(build(force=args.force))  # what the build did is in its BUILD_INFO_FILE
    return 0


if __name__ == "__main__":
    sys.exit(main())
