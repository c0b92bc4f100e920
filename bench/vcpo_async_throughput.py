"""Asynchronous (k = 4) vs synchronous (k = 0) VCPO: trained samples per second.

The real Algorithm (``VCPO.training_step``, one remote vLLM env runner, the learner in the
driver, 2 CPU cores) runs the tiny recipe with max_staleness 4 and 0, one after the other in
one invocation (twice each, alternating, outside --quick). After a warm-up iteration, samples/s
= trajectories trained / wall time over the measured iterations; also reported: the learner's
busy fraction and the staleness actually seen.

    .venv/bin/python bench/vcpo_async_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import RESULTS, markdown_table, write_results
from vcpo_common import tiny_config

NAME = "vcpo_async_throughput"


def measure(k: int, iterations: int) -> dict:
    from rllib_ext import registry

    registry.register_project_envs()
    algo = tiny_config(max_staleness=k, updates_per_iteration=5,
                       accuracy_eval_interval=0).build_algo()
    try:
        algo.train()  # warm-up: engine, first weights
        trained, busy, staleness = 0, [], []
        started = time.perf_counter()
        for _ in range(iterations):
            result = algo.train()
            trained += 5 * algo.config.train_batch_size_per_learner
            busy.append(result["vcpo"]["learner_busy_fraction"])
            staleness.append(result["learners"]["default_policy"]["staleness_mean"])
        seconds = time.perf_counter() - started
    finally:
        algo.stop()
    row = {"k": k, "samples_per_s": trained / seconds, "learner_busy": statistics.mean(busy),
           "staleness_mean": statistics.mean(staleness)}
    print(row, flush=True)
    return row


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    labels = [f"k={row['k']} (run {i + 1})" for i, row in enumerate(rows)]
    axis.bar(labels, [row["samples_per_s"] for row in rows],
             color=["tab:gray" if row["k"] == 0 else "tab:blue" for row in rows])
    axis.set_ylabel("trained trajectories / s")
    axis.set_title("VCPO async vs sync, tiny recipe, 2 CPU cores")
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run each, 3 iterations")
    args = parser.parse_args(argv)
    iterations, order = (3, (0, 4)) if args.quick else (8, (0, 4, 0, 4))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows = [measure(k, iterations) for k in order]
    ray.shutdown()
    sync = statistics.mean(r["samples_per_s"] for r in rows if r["k"] == 0)
    async_ = statistics.mean(r["samples_per_s"] for r in rows if r["k"] == 4)
    flat = {"sync_samples_per_s": round(sync, 1), "async_k4_samples_per_s": round(async_, 1),
            "async_over_sync": round(async_ / sync, 2), "goal_async_over_sync": 1.5,
            "sync_learner_busy": round(statistics.mean(
                r["learner_busy"] for r in rows if r["k"] == 0), 3),
            "async_learner_busy": round(statistics.mean(
                r["learner_busy"] for r in rows if r["k"] == 4), 3)}
    table = markdown_table(
        ["run", "k", "samples/s", "learner busy", "mean staleness"],
        [[i + 1, r["k"], f"{r['samples_per_s']:.0f}", f"{r['learner_busy']:.0%}",
          f"{r['staleness_mean']:.2f}"] for i, r in enumerate(rows)])
    notes = [f"async/sync = {flat['async_over_sync']}x (goal >= 1.5x).",
             f"{iterations} measured iterations of 5 learner updates (128 trajectories each) per "
             "run after one warm-up iteration; one remote vLLM env runner, learner in the "
             "driver, tiny recipe (tuned_examples/vcpo_math_tiny.yaml)."]
    plot(rows)
    write_results(NAME, flat, "VCPO asynchronous vs synchronous sampling", table, notes,
                  args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
