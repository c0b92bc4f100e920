"""Held-out reward and accuracy of a model on a task's split, with any generation backend.

From training, :meth:`LLMEnvRunner.evaluate` calls :func:`evaluate_task` with the runner's live
engine (current weights). Alone, on a model directory, a hub id, "tiny", an RLlib checkpoint of
an LLM algorithm (its trained weights, exported to a temporary folder first) or a folder written
by ``rllib export``:

    python -m rllib_ext.llm.evaluation --model tiny --split test
    python -m rllib_ext.llm.evaluation --model runs/EXP/TRIAL/checkpoint_000005
    python -m rllib_ext.llm.evaluation --model PATH --env-config '{"dataset": {"path": "x.jsonl",
        "test_fraction": 0.1}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from rllib_ext.llm.generation import SamplingSettings
from rllib_ext.llm.task import Task

# What evaluate_task reports (and VCPO adds policy_version); per reward function:
# rewards/<name>.
EVALUATION_METRICS = ("reward_mean", "accuracy", "num_problems", "response_length_mean",
                      "truncated_fraction", "eval_time_s", "policy_version")


def evaluate_task(backend, task: Task, *, num_problems: int | None = None,
                  temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 8,
                  batch_size: int = 256) -> dict:
    """One sample per prompt (greedy when ``temperature == 0``) for the first ``num_problems``
    prompts of ``task`` (all when None): the mean reward, each reward function's mean
    (``rewards/<name>``), the accuracy where the task knows it, response lengths."""
    prompts = task.prompts if num_problems is None else task.prompts[:num_problems]
    sampling = SamplingSettings(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    started = time.perf_counter()
    rewards, correct, lengths, truncated = [], [], [], 0
    per_function: dict[str, list[float]] = {}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        completions = [group[0] for group in backend.generate([p.token_ids for p in batch],
                                                              sampling)]
        scores = task.score(batch, [task.decode(c.token_ids) for c in completions])
        rewards += scores.rewards
        correct += scores.correct or []
        for name, values in scores.per_function.items():
            per_function.setdefault(name, []).extend(v for v in values if v is not None)
        lengths += [len(c.token_ids) for c in completions]
        truncated += sum(c.finish_reason == "length" for c in completions)
    count = max(1, len(prompts))
    result = {"reward_mean": float(np.mean(rewards)) if rewards else 0.0,
              **{f"rewards/{name}": float(np.mean(values))
                 for name, values in per_function.items() if values}}
    if correct:
        result["accuracy"] = float(np.mean(correct))
    return {**result, "num_problems": len(prompts),
            "response_length_mean": sum(lengths) / count, "truncated_fraction": truncated / count,
            "eval_time_s": time.perf_counter() - started}


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # The result is the JSON on stdout; vLLM's messages go to stderr, warnings and up only.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from ray.rllib.env.env_context import EnvContext

    from rllib_ext import registry
    from rllib_ext.llm.export import export_model, is_rllib_checkpoint
    from rllib_ext.llm.generation import make_backend
    from rllib_ext.llm.tiny import resolve_model

    parser = argparse.ArgumentParser(
        prog="python -m rllib_ext.llm.evaluation",
        description="Reward and accuracy of a model (or an RLlib checkpoint) on a task's split.")
    parser.add_argument("--model", default="tiny",
                        help="'tiny', a model directory, a hub id, an RLlib checkpoint directory "
                             "or a folder written by `rllib export`")
    parser.add_argument("--env", default="MathEnv",
                        help="the task (an rllib-ext env name or package.module:Class)")
    parser.add_argument("--env-config", default="{}", metavar="JSON",
                        help="the task's env_config, e.g. '{\"dataset\": {\"name\": \"gsm8k\", "
                             "\"path\": \"x.jsonl\"}}'")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-problems", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-prompt-tokens", type=int, default=64)
    parser.add_argument("--max-response-tokens", type=int, default=8)
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    args = parser.parse_args(argv)
    try:
        env_config = json.loads(args.env_config)
    except json.JSONDecodeError as e:
        parser.error(f"--env-config is not valid JSON ({e.msg}); quote it as one shell word")
    with tempfile.TemporaryDirectory(prefix="rllib-ext-eval-") as exported:
        model = args.model
        if is_rllib_checkpoint(model):
            model = str(export_model(model, exported))
        model = resolve_model(model)
        task_class = registry.import_object(registry.PROJECT_ENVS.get(args.env, args.env))
        task = task_class(EnvContext({**env_config, "tokenizer": model, "split": args.split,
                                      "shuffle": False,
                                      "max_prompt_tokens": args.max_prompt_tokens},
                                     worker_index=0, num_workers=0))
        backend = make_backend(args.backend, model,
                               max_model_len=args.max_prompt_tokens + args.max_response_tokens)
        try:
            result = evaluate_task(backend, task, num_problems=args.num_problems,
                                   temperature=args.temperature, top_p=args.top_p,
                                   max_tokens=args.max_response_tokens)
        finally:
            backend.close()
            task.close()
    print(json.dumps({"model": args.model, "split": args.split, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
