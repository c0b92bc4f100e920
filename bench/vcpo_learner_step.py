"""Learner-step time: VCPO (cheap and exact OPOB routes) vs plain GRPO.

Three VCPO learners with the tiny recipe's settings take turns on the same batches of real
episodes (generated once by an LLMEnvRunner, transformers backend):

* ``GRPO``: no IS correction, group mean/std baseline, no ESS scaling (one forward, one backward);
* ``VCPO cheap``: seq-TIS + ESS-scaled lr + OPOB with exact per-trajectory gradient norms from
  one forward and one backward with activation capture (``opob_grad_norms="ghost"``);
* ``VCPO exact``: the same with the reference's route, one backward per trajectory (``"loop"``).

The whole ``Learner.update`` is timed (episodes -> batch, forward, backward, optimiser step,
metrics), round after round in turn so machine noise hits all alike; reported: median time and
the median of per-round ratios to GRPO.

    .venv/bin/python bench/vcpo_learner_step.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import RESULTS, markdown_table, write_results
from vcpo_common import METHODS, local_learner, local_runner, tiny_config

NAME = "vcpo_learner_step"
VARIANTS = {
    "GRPO": dict(METHODS["sync GRPO"]),
    "VCPO cheap": dict(METHODS["VCPO"], opob_grad_norms="ghost"),
    "VCPO exact": dict(METHODS["VCPO"], opob_grad_norms="loop"),
}


def measure(batch_trajectories: int, rounds: int) -> dict:
    samples = batch_trajectories // 128
    config = tiny_config(generation_backend="transformers", lr=1e-5,
                         train_batch_size_per_learner=batch_trajectories)
    runner = local_runner(config)
    episodes = [e for _ in range(samples) for e in runner.sample()]
    runner.stop()
    learners = {name: local_learner(tiny_config(train_batch_size_per_learner=batch_trajectories,
                                                lr=1e-5, **settings), runner)
                for name, settings in VARIANTS.items()}
    times = {name: [] for name in learners}
    for learner in learners.values():  # warm-up
        learner.update(episodes=episodes)
    for _ in range(rounds):
        for name, learner in learners.items():
            started = time.perf_counter()
            learner.update(episodes=episodes)
            times[name].append(time.perf_counter() - started)
    tokens = sum(int(e.get_extra_model_outputs("response_length", 0)) for e in episodes)
    result = {"trajectories": len(episodes), "response_tokens": tokens}
    for name in learners:
        result[name] = statistics.median(times[name])
        result[f"{name} ratio"] = statistics.median(
            t / g for t, g in zip(times[name], times["GRPO"]))
    print(result, flush=True)
    return result


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.27
    for i, name in enumerate(VARIANTS):
        axis.bar([x + (i - 1) * width for x in range(len(rows))],
                 [1000 * row[name] for row in rows], width, label=name)
    axis.set_xticks(range(len(rows)), [f"{row['trajectories']} trajectories" for row in rows])
    axis.set_ylabel("learner update, ms (median)")
    axis.set_yscale("log")
    axis.set_title("VCPO learner step vs GRPO (tiny model, CPU)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one batch size, 5 rounds")
    args = parser.parse_args(argv)
    sizes, rounds = ((128,), 5) if args.quick else ((128, 512), 15)
    rows = [measure(size, rounds) for size in sizes]
    flat = {}
    for row in rows:
        size = row["trajectories"]
        flat[f"grpo_ms_{size}"] = round(1000 * row["GRPO"], 1)
        flat[f"vcpo_cheap_ms_{size}"] = round(1000 * row["VCPO cheap"], 1)
        flat[f"vcpo_exact_ms_{size}"] = round(1000 * row["VCPO exact"], 1)
        flat[f"vcpo_cheap_overhead_{size}"] = round(row["VCPO cheap ratio"] - 1, 3)
        flat[f"vcpo_exact_overhead_{size}"] = round(row["VCPO exact ratio"] - 1, 3)
    flat["goal_cheap_overhead"] = 0.10
    table = markdown_table(
        ["trajectories (tokens)", "GRPO ms", "VCPO cheap ms (overhead)",
         "VCPO exact ms (overhead)"],
        [[f"{r['trajectories']} ({r['response_tokens']})", f"{1000 * r['GRPO']:.0f}",
          f"{1000 * r['VCPO cheap']:.0f} ({r['VCPO cheap ratio'] - 1:+.0%})",
          f"{1000 * r['VCPO exact']:.0f} ({r['VCPO exact ratio'] - 1:+.0%})"] for r in rows])
    notes = ["Whole Learner.update timed (episodes -> batch, forward, backward, optimiser step, "
             "metrics); overhead = median over rounds of time / GRPO's time in the same round, "
             "minus 1.",
             "goal: VCPO cheap route <= 10% over GRPO; the table is what was measured."]
    plot(rows)
    write_results(NAME, flat, "VCPO learner step vs plain GRPO", table, notes, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
