"""Rollout throughput: the vLLM env runner vs the transformers backend, same tiny model,
prompts and sampling; plus the latency of an in-place weight sync into the live engine.

Three workloads:

* ``training``: ``LLMEnvRunner.sample()`` exactly as the tiny VCPO recipe calls it (16 prompts x
  n = 8 responses of at most 6 tokens, temperature 1, answers graded): what training sees.
* ``fixed``: the backend alone on 64 prompts x n = 8 responses of exactly 32 tokens (end of
  sequence suppressed): equal work per sequence, per-call overheads matter less.
* ``variable``: the backend alone on 64 prompts x n = 8 responses that stop at their own
  end-of-sequence token, at most 128 tokens: RL's long-tailed lengths, where a padded batch
  keeps computing finished sequences until the longest ends.

vLLM runs in both layouts: its engine inside the env runner's process (the default on CPU) and
in processes of its own (vLLM's default, the default on GPUs). Each variant runs in its own
child process (vLLM's in-process CPU engine pins its process's OpenMP threads, which would
distort the others); the children run one after the other in one invocation. Tokens/s are
generated tokens over wall time, median of rounds.

    .venv/bin/python bench/rollout_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

from common import RESULTS, markdown_table, write_results

NAME = "rollout_throughput"
# name -> (generation_backend, engine_in_process)
BACKENDS = {"vllm": ("vllm", True), "vllm separate": ("vllm", False),
            "transformers": ("transformers", "auto")}
WORKLOADS = ("training", "fixed", "variable")


def measure(kind: str, in_process, rounds: int, sync_repeats: int, queue) -> None:
    """Child process: time one backend on all workloads (and weight syncs for vLLM)."""
    import numpy as np
    import torch

    from rllib_ext import registry
    from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig
    from rllib_ext.llm.env_runner import LLMEnvRunner, hf_state_dict_from_module_state
    from rllib_ext.llm.generation import SamplingSettings
    from rllib_ext.llm.tiny import TINY_ARITHMETIC_DATASET

    config = (VCPOConfig()
              .environment("MathEnv", env_config={"dataset": TINY_ARITHMETIC_DATASET})
              .llm_rollouts(generation_backend=kind, engine_in_process=in_process,
                            prompts_per_sample=16, num_generations=8, max_prompt_tokens=16,
                            max_response_tokens=32)
              .debugging(seed=0))
    registry.register_project_envs()
    started = time.perf_counter()
    runner = LLMEnvRunner(config=config, worker_index=0, num_workers=0)
    result = {"startup_s": time.perf_counter() - started}

    # Training workload (max 6 tokens, as the tiny recipe), through the env runner.
    runner.config.max_response_tokens = 6
    runner.sample()  # warm-up
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        episodes = runner.sample()
        seconds = time.perf_counter() - started
        tokens = sum(int(e.get_extra_model_outputs("response_length", 0)) for e in episodes)
        rates.append(tokens / seconds)
    result["training_tokens_per_s"] = statistics.median(rates)
    result["training_episodes_per_s"] = statistics.median(
        r * len(episodes) / tokens for r in rates)

    # The backend alone.
    prompts = [prompt.token_ids for prompt in runner.env.prompts[:64]]
    workloads = {"fixed": SamplingSettings(n=8, temperature=1.0, max_tokens=32, min_tokens=32),
                 "variable": SamplingSettings(n=8, temperature=1.0, max_tokens=128)}
    for name, sampling in workloads.items():
        runner.backend.generate(prompts[:4], sampling)  # warm-up
        rates, lengths = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            groups = runner.backend.generate(prompts, sampling)
            seconds = time.perf_counter() - started
            tokens = [len(c.token_ids) for g in groups for c in g]
            rates.append(sum(tokens) / seconds)
            lengths += tokens
        result[f"{name}_tokens_per_s"] = statistics.median(rates)
        result[f"{name}_mean_length"] = statistics.mean(lengths)
        result[f"{name}_max_length"] = max(lengths)

    if kind == "vllm":
        # What set_state does with RLlib's module state (numpy, "model."-prefixed names).
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(runner.model_path, dtype=torch.float32)
        module_state = {f"model.{k}": v.numpy() for k, v in model.state_dict().items()}
        latencies = []
        for i in range(sync_repeats):
            noisy = {k: v + np.float32(1e-4 * (i + 1)) for k, v in module_state.items()}
            started = time.perf_counter()
            runner.backend.load_weights(hf_state_dict_from_module_state(noisy))
            latencies.append(time.perf_counter() - started)
        result["weight_sync_ms_median"] = 1000 * statistics.median(latencies)
        result["weight_sync_ms_max"] = 1000 * max(latencies)
        result["num_parameters"] = sum(v.size for v in module_state.values())
    runner.stop()
    queue.put(result)


def run_child(name: str, rounds: int, sync_repeats: int) -> dict:
    kind, in_process = BACKENDS[name]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=measure, args=(kind, in_process, rounds, sync_repeats, queue))
    child.start()
    result = queue.get(timeout=900)
    child.join(timeout=60)
    print(f"{name}: {result}", flush=True)
    return result


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    workloads = WORKLOADS
    width = 0.27
    for i, name in enumerate(BACKENDS):
        values = [results[name][f"{w}_tokens_per_s"] for w in workloads]
        axis.bar([x + (i - 1) * width for x in range(len(workloads))], values, width,
                 label=name)
    axis.set_xticks(range(len(workloads)), [f"{w} workload" for w in workloads])
    axis.set_ylabel("generated tokens / s")
    axis.set_title("Rollout throughput, tiny model, 2 CPU cores")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and syncs (same code path)")
    args = parser.parse_args(argv)
    rounds, sync_repeats = (3, 5) if args.quick else (10, 20)
    results = {name: run_child(name, rounds, sync_repeats) for name in BACKENDS}
    vllm, separate, hf = results["vllm"], results["vllm separate"], results["transformers"]
    flat = {
        "vllm_training_tokens_per_s": round(vllm["training_tokens_per_s"], 1),
        "transformers_training_tokens_per_s": round(hf["training_tokens_per_s"], 1),
        "training_speedup_vllm_over_transformers": round(
            vllm["training_tokens_per_s"] / hf["training_tokens_per_s"], 2),
        **{f"{name.replace(' ', '_')}_{w}_tokens_per_s":
           round(results[name][f"{w}_tokens_per_s"], 1)
           for name in BACKENDS for w in ("fixed", "variable")},
        **{f"{w}_speedup_vllm_over_transformers": round(
            vllm[f"{w}_tokens_per_s"] / hf[f"{w}_tokens_per_s"], 2)
           for w in ("fixed", "variable")},
        **{f"{w}_speedup_vllm_separate_over_transformers": round(
            separate[f"{w}_tokens_per_s"] / hf[f"{w}_tokens_per_s"], 2) for w in WORKLOADS},
        "variable_mean_length": round(vllm["variable_mean_length"], 1),
        "variable_max_length": vllm["variable_max_length"],
        "weight_sync_ms_median": round(vllm["weight_sync_ms_median"], 1),
        "weight_sync_ms_max": round(vllm["weight_sync_ms_max"], 1),
        "vllm_engine_startup_s": round(vllm["startup_s"], 1),
        "num_parameters": vllm["num_parameters"],
        "goal_speedup": 5.0,
    }
    rows = [[workload,
             f"{vllm[f'{workload}_tokens_per_s']:,.0f}",
             f"{separate[f'{workload}_tokens_per_s']:,.0f}",
             f"{hf[f'{workload}_tokens_per_s']:,.0f}",
             f"{vllm[f'{workload}_tokens_per_s'] / hf[f'{workload}_tokens_per_s']:.1f}x",
             f"{separate[f'{workload}_tokens_per_s'] / hf[f'{workload}_tokens_per_s']:.1f}x"]
            for workload in WORKLOADS]
    table = markdown_table(["workload", "vLLM in-process tok/s (CPU default)",
                            "vLLM separate processes tok/s", "transformers tok/s",
                            "speedup in-process (goal >= 5x)", "speedup separate"], rows)
    notes = [
        "training: LLMEnvRunner.sample() with the tiny recipe's settings (16 prompts x 8 "
        "responses, <= 6 tokens, temperature 1), grading included.",
        "fixed: backend.generate on 64 prompts x 8 responses of exactly 32 tokens.",
        f"variable: backend.generate on 64 prompts x 8 responses ending at their own "
        f"end-of-sequence token (<= 128): mean length {flat['variable_mean_length']}, longest "
        f"{flat['variable_max_length']} (vLLM run).",
        f"weight sync (RLlib module state -> in-place reload in the live vLLM engine, "
        f"{vllm['num_parameters']:,} parameters): median {flat['weight_sync_ms_median']} ms, "
        f"max {flat['weight_sync_ms_max']} ms over {sync_repeats} syncs.",
        f"vLLM engine start: {flat['vllm_engine_startup_s']} s in-process, "
        f"{separate['startup_s']:.1f} s with its own processes.",
    ]
    plot(results)
    write_results(NAME, flat, "Rollout throughput: vLLM env runner vs transformers backend",
                  table, notes, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
