"""Asynchronous (k = 4) vs synchronous (k = 0) VCPO: trained samples per second.

The real Algorithm (``VCPO.training_step``, one remote vLLM env runner each, the learner in the
driver, 2 CPU cores) runs the tiny recipe with max_staleness 0 and 4. Both algorithms are built
once and then take turns in blocks of iterations, in ABBA order (sync, async, async, sync, ...),
so that the drift of a shared machine's speed over minutes hits both alike. Only one computes at
a time: a block ends when the requests it queued have finished (their samples stay buffered for
that algorithm's next block), so each block times all the work it set going. Per block,
samples/s = trajectories trained / wall time; reported: the median over block pairs of async /
sync, mean samples/s, the learner's busy fraction and the staleness actually seen.

    .venv/bin/python bench/vcpo_async_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import RESULTS, markdown_table, write_results
from vcpo_common import tiny_config

NAME = "vcpo_async_throughput"
UPDATES_PER_ITERATION = 5


def build(k: int):
    algo = tiny_config(max_staleness=k, updates_per_iteration=UPDATES_PER_ITERATION,
                       accuracy_eval_interval=0).build_algo()
    for _ in range(2):  # warm-up: engine, first weights, a full request queue
        algo.train()
    return algo


def run_block(algo, iterations: int) -> dict:
    trained, busy, staleness = 0, [], []
    started = time.perf_counter()
    for _ in range(iterations):
        result = algo.train()
        trained += UPDATES_PER_ITERATION * algo.config.train_batch_size_per_learner
        busy.append(result["vcpo"]["learner_busy_fraction"])
        staleness.append(result["learners"]["default_policy"]["staleness_mean"])
    # The requests this block queued finish inside its timed window (VCPO has no public drain).
    while algo._staleness.in_flight:
        algo._collect()
    seconds = time.perf_counter() - started
    row = {"k": algo.config.max_staleness, "samples_per_s": trained / seconds,
           "learner_busy": statistics.mean(busy), "staleness_mean": statistics.mean(staleness)}
    print(row, flush=True)
    return row


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for k, color in ((0, "tab:gray"), (4, "tab:blue")):
        blocks = [(i + 1, row["samples_per_s"]) for i, row in enumerate(rows) if row["k"] == k]
        axis.plot(*zip(*blocks), "o-", color=color, label=f"k={k}")
    axis.set_xlabel("block (in run order)")
    axis.set_ylabel("trained trajectories / s")
    axis.set_ylim(bottom=0)
    axis.set_title("VCPO async vs sync, tiny recipe, 2 CPU cores")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    import ray

    from rllib_ext import registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 block pairs of 1 iteration")
    args = parser.parse_args(argv)
    pairs, iterations = (2, 1) if args.quick else (6, 2)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    registry.register_project_envs()
    algos = {k: build(k) for k in (0, 4)}
    rows = []
    try:
        for pair in range(pairs):
            for k in ((0, 4) if pair % 2 == 0 else (4, 0)):
                rows.append(run_block(algos[k], iterations))
    finally:
        for algo in algos.values():
            algo.stop()
        ray.shutdown()
    sync_rows = [r for r in rows if r["k"] == 0]
    async_rows = [r for r in rows if r["k"] == 4]
    ratios = [a["samples_per_s"] / s["samples_per_s"]
              for s, a in zip(sync_rows, async_rows, strict=True)]
    flat = {
        "sync_samples_per_s": round(statistics.mean(r["samples_per_s"] for r in sync_rows), 1),
        "async_k4_samples_per_s": round(statistics.mean(r["samples_per_s"] for r in async_rows),
                                        1),
        "async_over_sync": round(statistics.median(ratios), 2),
        "async_over_sync_min": round(min(ratios), 2),
        "async_over_sync_max": round(max(ratios), 2),
        "goal_async_over_sync": 1.5,
        "sync_learner_busy": round(statistics.mean(r["learner_busy"] for r in sync_rows), 3),
        "async_learner_busy": round(statistics.mean(r["learner_busy"] for r in async_rows), 3)}
    table = markdown_table(
        ["block", "k", "samples/s", "learner busy", "mean staleness"],
        [[i + 1, r["k"], f"{r['samples_per_s']:.0f}", f"{r['learner_busy']:.0%}",
          f"{r['staleness_mean']:.2f}"] for i, r in enumerate(rows)])
    notes = [f"async/sync = {flat['async_over_sync']}x, median over {pairs} block pairs "
             f"(range {flat['async_over_sync_min']}-{flat['async_over_sync_max']}x; goal >= "
             "1.5x).",
             f"Blocks of {iterations} iterations x {UPDATES_PER_ITERATION} learner updates (128 "
             "trajectories each) in ABBA order, both algorithms built and warmed up first; one "
             "remote vLLM env runner each, learner in the driver, tiny recipe "
             "(tuned_examples/vcpo_math_tiny.yaml)."]
    plot(rows)
    write_results(NAME, flat, "VCPO asynchronous vs synchronous sampling", table, notes,
                  args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
