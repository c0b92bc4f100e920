"""Where the demo's time goes: a sampling profile (py-spy) of its two processes, the driver
(learner) and the env runner (vLLM engine in-process), while it trains.

The demo (tuned_examples/vcpo_math_tiny.yaml, held-out evaluation off, Ray's workers at the
driver's niceness, as in bench/vcpo_vs_sync_loop.py) trains for the recording window while
py-spy samples each process's main thread, waits included (``--idle``), so the shares are of
wall time. Each sample goes to the first phase whose function is on its stack (the tables list
them in that order). Needs py-spy (``pip install -e ".[bench]"``) and the right to trace
processes (root, or ptrace allowed).

    .venv/bin/python bench/profile_demo.py [--quick]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, markdown_table, write_results
from vcpo_common import env_runner_pid, start_demo

NAME = "profile_demo"
RATE_HZ = 100
# (phase, functions that put a sample in it), first match wins.
DRIVER_PHASES = [
    ("VCPO step: per-sample gradient-norm hooks", ["PerSampleGradients._on_output_grad"]),
    ("VCPO step: rest of the backward pass", ["PerSampleGradients.backward"]),
    ("VCPO step: forward pass", ["VCPOStep._forward"]),
    ("VCPO step: the weighted gradient", ["PerSampleGradients.accumulate_grads"]),
    ("VCPO step: rest", ["VCPOStep.compute_gradients"]),
    ("clipping and AdamW", ["TorchLearner.apply_gradients", "Learner.postprocess_gradients"]),
    ("learner connector (episodes -> batch)", ["LearnerConnectorPipeline.__call__"]),
    ("Learner.update: rest (RLlib)", ["Learner.update"]),
    ("episodes rebuilt from the sample's reply", ["episodes_from_columns"]),
    ("weights packed and pushed", ["VCPO._current_weights", "VCPO._push_weights"]),
    ("waiting for a sample", ["VCPO._wait_for_first", "VCPO._collect"]),
]
RUNNER_PHASES = [
    ("vLLM generation", ["VLLMBackend.generate"]),
    ("weight load into the engine", ["LLMEnvRunner._load_weights"]),
    ("grading (waits for the grading process)", ["AnswerChecker.grade_many"]),
    ("episodes built", ["LLMEnvRunner._episode"]),
    ("sample(): rest (prompts, decoding, metrics)", ["LLMEnvRunner.sample"]),
    ("state and metrics for the reply", ["LLMEnvRunner.get_state", "LLMEnvRunner.get_metrics"]),
    ("Ray around the calls", [
        "FunctionActorManager._make_actor_method_executor.<locals>.actor_method_executor"]),
]
# What the main thread does outside every phase above.
REST = {"driver": "rest (RLlib's training step, metrics, Ray)",
        "env runner": "idle (waiting for the next request)"}


def function_names(stack: str) -> set[str]:
    """The function names on a py-spy raw stack line ("name (file:line);...")."""
    return {frame.split(" (", 1)[0] for frame in stack.split(";")}


def phase_shares(raw: Path, phases: list[tuple[str, list[str]]], rest: str
                 ) -> tuple[dict, int]:
    """Share of the main thread's samples per phase (first match wins; ``rest`` for the
    others)."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.split(";", 1)[0].startswith("<module>"):
            continue  # not the main thread
        names = function_names(stack)
        phase = next((name for name, functions in phases if names & set(functions)), rest)
        counts[phase] += int(count)
        total += int(count)
    return {name: counts[name] / max(total, 1) for name, _ in [*phases, (rest, [])]}, total


def key(phase: str) -> str:
    """A JSON key for a phase name ("VCPO step: forward pass" -> "vcpo_step_forward_pass")."""
    words = "".join(c if c.isalnum() else " " for c in phase.split(" (")[0].lower()).split()
    return "_".join(words)


def plot(shares: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.2))
    colors = plt.get_cmap("tab20").colors
    for row, parts in enumerate(shares.values()):
        left = 0.0
        for k, share in enumerate(parts.values()):
            axis.barh(row, share, left=left, color=colors[k % len(colors)], edgecolor="white")
            if share > 0.06:
                axis.text(left + share / 2, row, f"{share:.0%}", ha="center", va="center",
                          fontsize=7)
            left += share
    axis.set_yticks(range(len(shares)), list(shares))
    axis.set_xlabel("share of wall time (main thread); phases in the .md's order")
    axis.set_xlim(0, 1)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 15 s recording")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or \
        shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    seconds = 15 if args.quick else 60
    algo = start_demo(updates_per_iteration=10)
    out = Path(tempfile.mkdtemp(prefix="profile_demo_"))
    try:
        algo.train()  # warm-up
        pids = {"driver": os.getpid(), "env runner": env_runner_pid(algo)}
        recorders = [subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
             str(RATE_HZ), "--idle", "--nonblocking", "--format", "raw", "--output",
             str(out / f"{name.replace(' ', '_')}.raw")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]
        time.sleep(1.0)  # py-spy attaches
        started, updates = time.perf_counter(), 0
        while any(r.poll() is None for r in recorders):
            algo.train()
            updates += algo.config.updates_per_iteration
        wall = time.perf_counter() - started
    finally:
        algo.stop()
        ray.shutdown()
    shares, samples = {}, {}
    for name, phases in (("driver", DRIVER_PHASES), ("env runner", RUNNER_PHASES)):
        shares[name], samples[name] = phase_shares(out / f"{name.replace(' ', '_')}.raw",
                                                   phases, REST[name])
    per_update = wall / updates
    flat = {"seconds_recorded": seconds, "updates": updates,
            "s_per_update": round(per_update, 4),
            **{f"{process.replace(' ', '_')}_share_{key(name)}": round(share, 3)
               for process, parts in shares.items() for name, share in parts.items()}}
    tables = []
    for process, parts in shares.items():
        tables.append(f"{process} ({samples[process]} samples):\n\n" + markdown_table(
            ["phase", "share of wall time", "s per update"],
            [[name, f"{share:.1%}", f"{share * per_update:.4f}"]
             for name, share in parts.items()]))
        print(tables[-1], flush=True)
    notes = [
        f"{updates} updates in {wall:.0f} s ({per_update:.3f} s per update) while py-spy "
        f"sampled each process's main thread at {RATE_HZ} Hz, waits included.",
        "The two processes overlap: the driver's 'waiting for a sample' is time the env runner "
        "has not finished the next sample; the env runner's idle time is time the driver has "
        "not asked for one (at most two requests wait on it, and the staleness bound admits no more).",
        *tables[1:],
        "The 2-core machine may be shared with other jobs; the shares are of this run.",
    ]
    plot(shares)
    write_results(NAME, flat, "Where the demo's time goes (py-spy, wall time per phase)",
                  tables[0], notes, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
