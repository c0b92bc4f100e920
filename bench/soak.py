"""Soak: the tiny VCPO recipe for 20 minutes (--quick: 3), watching resident memory.

Records, every iteration, the resident set size (RSS) of the learner (this process: the
Algorithm with its local learner) and of the env runner actor with its child processes (vLLM
engine, answer-checking process), plus failed iterations. Goal: no growth beyond 10% after the
first 2 minutes (warm-up: engines, caches, allocator pools), zero failed iterations.
Growth = median RSS over the last 20% of the run / median RSS of the minute after warm-up - 1.

    .venv/bin/python bench/soak.py [--quick] [--minutes M]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import traceback

import psutil
from common import RESULTS, markdown_table, write_results
from vcpo_common import tiny_config

NAME = "soak"
WARMUP_S = 120.0


def tree_rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    processes = [process] + process.children(recursive=True)
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def runner_pid(algo) -> int:
    [pid] = algo.env_runner_group.foreach_env_runner(lambda runner: os.getpid(),
                                                     local_env_runner=False)
    return pid


def growth(rows: list[dict], key: str, duration_s: float) -> tuple[float, float, float]:
    """(baseline, final, relative growth) of ``key``: the minute after warm-up vs the last
    20% of the run."""
    warm = [r[key] for r in rows if WARMUP_S <= r["t"] <= WARMUP_S + 60] or \
        [r[key] for r in rows if r["t"] >= WARMUP_S][:3]
    last = [r[key] for r in rows if r["t"] >= 0.8 * duration_s]
    baseline, final = statistics.median(warm), statistics.median(last)
    return baseline, final, final / baseline - 1


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    minutes = [r["t"] / 60 for r in rows]
    axis.plot(minutes, [r["learner_mb"] for r in rows], label="learner (driver) RSS")
    axis.plot(minutes, [r["runner_mb"] for r in rows], label="env runner + engine RSS")
    axis.axvline(WARMUP_S / 60, color="gray", linestyle=":", label="end of warm-up")
    axis.set_xlabel("minutes")
    axis.set_ylabel("MiB")
    axis.set_title("Soak: tiny VCPO recipe, resident memory")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    import ray

    from rllib_ext import registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 minutes instead of 20")
    parser.add_argument("--minutes", type=float, default=None)
    args = parser.parse_args(argv)
    duration_s = 60 * (args.minutes or (3 if args.quick else 20))

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    registry.register_project_envs()
    algo = tiny_config(updates_per_iteration=10, accuracy_eval_interval=5).build_algo()
    me = os.getpid()
    pid = runner_pid(algo)
    rows, failures, started = [], [], time.monotonic()
    try:
        while time.monotonic() - started < duration_s:
            try:
                result = algo.train()
            except Exception:  # counted, and the soak goes on
                failures.append(traceback.format_exc(limit=3))
                continue
            if not psutil.pid_exists(pid):
                pid = runner_pid(algo)
            rows.append({"t": time.monotonic() - started,
                         "iteration": result["training_iteration"],
                         "learner_mb": psutil.Process(me).memory_info().rss / 2**20,
                         "runner_mb": tree_rss_mb(pid),
                         "heldout": result.get("evaluation", {}).get("accuracy")})
            print(f"{rows[-1]['t'] / 60:5.1f} min  iter {rows[-1]['iteration']:4d}  learner "
                  f"{rows[-1]['learner_mb']:7.0f} MiB  runner {rows[-1]['runner_mb']:7.0f} MiB",
                  flush=True)
    finally:
        algo.stop()
        ray.shutdown()

    learner = growth(rows, "learner_mb", duration_s)
    runner = growth(rows, "runner_mb", duration_s)
    heldout = [r["heldout"] for r in rows
               if isinstance(r["heldout"], float) and math.isfinite(r["heldout"])]
    flat = {"duration_s": round(rows[-1]["t"]), "iterations": rows[-1]["iteration"],
            "failed_iterations": len(failures),
            "learner_rss_mb_after_warmup": round(learner[0]),
            "learner_rss_mb_final": round(learner[1]),
            "learner_rss_growth": round(learner[2], 4),
            "runner_rss_mb_after_warmup": round(runner[0]),
            "runner_rss_mb_final": round(runner[1]),
            "runner_rss_growth": round(runner[2], 4),
            "goal_max_growth": 0.10,
            "final_heldout_accuracy": round(heldout[-1], 4) if heldout else None}
    table = markdown_table(
        ["process", "RSS after warm-up (MiB)", "RSS at the end (MiB)", "growth (goal <= 10%)"],
        [["learner (driver)", f"{learner[0]:.0f}", f"{learner[1]:.0f}", f"{learner[2]:+.1%}"],
         ["env runner + engine", f"{runner[0]:.0f}", f"{runner[1]:.0f}",
          f"{runner[2]:+.1%}"]])
    notes = [f"{flat['iterations']} iterations (10 learner updates each) in "
             f"{flat['duration_s'] / 60:.1f} minutes; failed iterations: "
             f"{flat['failed_iterations']}; final held-out accuracy "
             f"{flat['final_heldout_accuracy'] or float('nan'):.1%}.",
             "RSS of the env runner includes its child processes (answer checking).",
             *[f"failure: {f.splitlines()[-1]}" for f in failures[:3]]]
    plot(rows)
    write_results(NAME, flat, "Soak: memory and failures over a long VCPO run", table, notes,
                  args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
