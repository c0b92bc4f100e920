"""Learner-step time: VCPO (cheap and exact OPOB routes) vs plain GRPO.

Three VCPO learners with the tiny recipe's settings take turns on the same batches of real
episodes (generated once by an LLMEnvRunner, transformers backend):

* ``GRPO``: no IS correction, group mean/std baseline, no ESS scaling (one forward, one backward);
* ``VCPO cheap``: seq-TIS + ESS-scaled lr + OPOB with exact per-trajectory gradient norms from
  one forward and one backward with activation capture (``opob_grad_norms="ghost"``);
* ``VCPO exact``: the same with the reference's route, one backward per trajectory (``"loop"``).

The whole ``Learner.update`` is timed (episodes -> batch, forward, backward, optimiser step,
metrics) as CPU time of the learner's process (``time.process_time``; the learner computes on
one thread, so this is its compute time without the waits for a core of a shared machine),
round after round in turn (the order reversed every other round) so the remaining noise hits
all alike; reported: median time, the median of per-round ratios to GRPO and their quartiles.
Each learner lives in its own process, as in a training run, so no learner's allocations shape
another's heap (before the learners kept freed heap memory, sharing one process cost the tiny
model's step ~2,500 page faults and ~4 ms).

Models: the embedded tiny model (what `make demo` trains: hidden 128, 2 layers, 0.45M
parameters) at two batch sizes, and an untrained wider Llama with the same tokenizer (hidden
512, 4 layers, 13.7M parameters) generating its own episodes: the overhead of the exact norms
is mostly per-layer work that shrinks relative to the step as layers widen.

    .venv/bin/python bench/vcpo_learner_step.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
from common import RESULTS, markdown_table, write_results
from vcpo_common import METHODS, local_learner, local_runner, module_spaces, tiny_config

from rllib_ext.llm.tiny import (
    TinyModelSpec,
    build_char_tokenizer,
    build_untrained_model,
    cache_root,
)

NAME = "vcpo_learner_step"
VARIANTS = {
    "GRPO": dict(METHODS["sync GRPO"]),
    "VCPO cheap": dict(METHODS["VCPO"], opob_grad_norms="ghost"),
    "VCPO exact": dict(METHODS["VCPO"], opob_grad_norms="loop"),
}


WARM_UP_UPDATES = 5
WIDE_SPEC = TinyModelSpec(hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8)


def wide_model() -> str:
    """The untrained wider Llama (char tokenizer of the tiny model), saved once."""
    target = cache_root() / "models" / f"bench-wide-{WIDE_SPEC.digest()}"
    if not (target / "config.json").exists():
        tokenizer = build_char_tokenizer()
        build_untrained_model(WIDE_SPEC, len(tokenizer)).save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)


def learner_process(settings: dict, model: str, batch_trajectories: int, spaces, episodes,
                    connection) -> None:
    """Builds one learner, then times ``Learner.update`` (CPU time) each time it is asked."""
    learner = local_learner(tiny_config(train_batch_size_per_learner=batch_trajectories, lr=1e-5,
                                        llm_model=model, **settings), spaces)
    for _ in range(WARM_UP_UPDATES):  # the first steps also grow the heap (page faults)
        learner.update(episodes=episodes)
    connection.send(sum(p.numel() for p in learner.module["default_policy"].parameters()))
    while connection.recv():
        started = time.process_time()
        learner.update(episodes=episodes)
        connection.send(time.process_time() - started)


def measure(model: str, batch_trajectories: int, rounds: int, exact_rounds: int) -> dict:
    samples = batch_trajectories // 128
    config = tiny_config(generation_backend="transformers", lr=1e-5, llm_model=model,
                         train_batch_size_per_learner=batch_trajectories)
    runner = local_runner(config)
    episodes = [e for _ in range(samples) for e in runner.sample()]
    spaces = module_spaces(runner)
    runner.stop()
    context = multiprocessing.get_context("spawn")
    learners, processes = {}, []
    for name, settings in VARIANTS.items():
        learners[name], child = context.Pipe()
        processes.append(context.Process(target=learner_process, daemon=True, args=(
            settings, model, batch_trajectories, spaces, episodes, child)))
        processes[-1].start()
    try:
        parameters = [connection.recv() for connection in learners.values()][0]
        times = {name: [] for name in learners}
        for round_ in range(rounds):
            order = list(learners.items())
            for name, connection in order[::-1] if round_ % 2 else order:  # cancels order effects
                if name == "VCPO exact" and round_ >= exact_rounds:
                    continue
                connection.send(True)
                times[name].append(connection.recv())
    finally:
        for connection in learners.values():
            connection.send(False)
        for process in processes:
            process.join(timeout=60)
    tokens = sum(int(e.get_extra_model_outputs("response_length", 0)) for e in episodes)
    result = {"model": "tiny" if model == "tiny" else "wide", "parameters": parameters,
              "trajectories": len(episodes), "response_tokens": tokens}
    for name in learners:
        result[name] = statistics.median(times[name])
        ratios = [t / g for t, g in zip(times[name], times["GRPO"])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        result[f"{name} ratio"] = statistics.median(ratios)
        result[f"{name} ratio quartiles"] = (quartiles[0], quartiles[2])
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
    axis.set_xticks(range(len(rows)), [f"{row['model']}, {row['trajectories']} traj."
                                       for row in rows])
    axis.set_ylabel("learner update, ms (median)")
    axis.set_yscale("log")
    axis.set_title("VCPO learner step vs GRPO (1 CPU thread)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="128 trajectories on each model, 3 rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each learner process (learner_cpus); the machine line says so
    # (model, trajectories, rounds, rounds of the slow exact route)
    plan = ([("tiny", 128, 3, 3), (wide_model(), 128, 3, 1)] if args.quick else
            [("tiny", 128, 40, 10), ("tiny", 512, 20, 5), (wide_model(), 128, 15, 3)])
    rows = [measure(*case) for case in plan]
    flat = {}
    for row in rows:
        key = f"{row['model']}_{row['trajectories']}"
        flat[f"grpo_ms_{key}"] = round(1000 * row["GRPO"], 1)
        flat[f"vcpo_cheap_ms_{key}"] = round(1000 * row["VCPO cheap"], 1)
        flat[f"vcpo_exact_ms_{key}"] = round(1000 * row["VCPO exact"], 1)
        flat[f"vcpo_cheap_overhead_{key}"] = round(row["VCPO cheap ratio"] - 1, 3)
        low, high = row["VCPO cheap ratio quartiles"]
        flat[f"vcpo_cheap_overhead_{key}_q1"] = round(low - 1, 3)
        flat[f"vcpo_cheap_overhead_{key}_q3"] = round(high - 1, 3)
        flat[f"vcpo_exact_overhead_{key}"] = round(row["VCPO exact ratio"] - 1, 3)
    flat["goal_cheap_overhead"] = 0.10
    table = markdown_table(
        ["model (parameters)", "trajectories (tokens)", "GRPO ms", "VCPO cheap ms (overhead)",
         "VCPO exact ms (overhead)"],
        [[f"{r['model']} ({r['parameters'] / 1e6:.2f}M)",
          f"{r['trajectories']} ({r['response_tokens']})", f"{1000 * r['GRPO']:.0f}",
          f"{1000 * r['VCPO cheap']:.0f} ({r['VCPO cheap ratio'] - 1:+.0%}; quartiles "
          f"{r['VCPO cheap ratio quartiles'][0] - 1:+.0%} to "
          f"{r['VCPO cheap ratio quartiles'][1] - 1:+.0%})",
          f"{1000 * r['VCPO exact']:.0f} ({r['VCPO exact ratio'] - 1:+.0%})"] for r in rows])
    notes = ["Whole Learner.update timed as process CPU time (episodes -> batch, forward, "
             "backward, optimiser step, metrics), each learner in its own process (as in a run) "
             "after 5 warm-up updates, taking turns; overhead = median over rounds of time / "
             "GRPO's time in the same round, minus 1, with the quartiles of those ratios (the "
             "exact route runs in the first rounds only).",
             "goal: VCPO cheap route <= 10% over GRPO; the table is what was measured."]
    plot(rows)
    write_results(NAME, flat, "VCPO learner step vs plain GRPO", table, notes, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
