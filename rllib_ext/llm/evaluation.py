"""Held-out accuracy of a model on a math split, with any generation backend.

From training, :meth:`LLMEnvRunner.evaluate` calls :func:`evaluate_accuracy` with the runner's
live engine (current weights). Alone:

    python -m rllib_ext.llm.evaluation --model tiny --split test
    python -m rllib_ext.llm.evaluation --model PATH --dataset '{"name": "gsm8k", "path": "x.jsonl"}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rllib_ext.llm.generation import SamplingSettings


def evaluate_accuracy(backend, env, *, num_problems: int | None = None,
                      temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 8,
                      batch_size: int = 256) -> dict:
    """Accuracy of one sample per problem (greedy when ``temperature == 0``) over the first
    ``num_problems`` problems of ``env`` (a :class:`envs.math.env.MathEnv`; all when None)."""
    count = len(env.problems) if num_problems is None else min(num_problems, len(env.problems))
    sampling = SamplingSettings(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    started = time.perf_counter()
    correct = generated = truncated = 0
    for start in range(0, count, batch_size):
        prompts = env.prompt_ids[start:min(count, start + batch_size)]
        completions = [group[0] for group in backend.generate(prompts, sampling)]
        texts = [env.decode_response(c.token_ids) for c in completions]
        golds = [p.answer for p in env.problems[start:start + len(prompts)]]
        correct += sum(g.correct for g in env.grade_many(texts, golds))
        generated += sum(len(c.token_ids) for c in completions)
        truncated += sum(c.finish_reason == "length" for c in completions)
    return {"accuracy": correct / max(1, count), "num_problems": count,
            "response_length_mean": generated / max(1, count),
            "truncated_fraction": truncated / max(1, count),
            "eval_time_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    from envs.math.env import MathEnv
    from rllib_ext.llm.generation import make_backend
    from rllib_ext.llm.tiny import resolve_model

    parser = argparse.ArgumentParser(prog="python -m rllib_ext.llm.evaluation",
                                     description="Accuracy of a model on a math split.")
    parser.add_argument("--model", default="tiny", help="'tiny', a local directory or a hub id")
    parser.add_argument("--dataset", default='{"name": "arithmetic"}',
                        help="JSON dataset config (see envs/math/datasets.py)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-problems", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-prompt-tokens", type=int, default=64)
    parser.add_argument("--max-response-tokens", type=int, default=8)
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    args = parser.parse_args(argv)
    model = resolve_model(args.model)
    env = MathEnv({"dataset": json.loads(args.dataset), "split": args.split, "tokenizer": model,
                   "shuffle": False, "max_prompt_tokens": args.max_prompt_tokens,
                   "max_response_tokens": args.max_response_tokens})
    backend = make_backend(args.backend, model,
                           max_model_len=args.max_prompt_tokens + args.max_response_tokens)
    try:
        result = evaluate_accuracy(backend, env, num_problems=args.num_problems,
                                   temperature=args.temperature, top_p=args.top_p,
                                   max_tokens=args.max_response_tokens)
    finally:
        backend.close()
        env.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
