"""TMF-PG with one agent acting per step vs all N acting (the paper's first claim).

TMF-PG is trained through RLlib (TMFPG Algorithm, MultiAgentEnvRunner, the learner) on the
same game with the same N, once with ``activation: all`` and once with ``sequential``. Both
runs sample the same number of complete episodes per iteration, and an episode holds about
N * rounds agent actions under either schedule (sequential: H = N * rounds env steps), so
both see the same amount of agent experience. Reported (mean of the last 5 iterations):

* return per agent (sampled episodes, total reward / N), the N-agent counterpart of J;
* exploitability of the learned policy in the exact mean-field model of its schedule
  (alpha = 1 vs 1/N).

Goal: within 5% of each other. The exploitability difference is reported relative to the
uniform policy's exploitability (both are near 0 at the end, so a ratio of the two small
numbers would measure noise).

    .venv/bin/python bench/tmf_sequential_vs_synchronous.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402
from tmf_common import init_ray, train  # noqa: E402

from envs.mean_field import DynamicQueueingEnv, ResourceSelectionEnv  # noqa: E402
from rllib_ext.algorithms.tmf_pg import TMFPGConfig  # noqa: E402

NAME = "tmf_sequential_vs_synchronous"
SCHEDULES = ("all", "sequential")
ROUNDS = 10
EPISODES = 4


def run(env_class, n: int, schedule: str, iterations: int, seed: int) -> list[dict]:
    # lr 0.01 -> 0.002 over the run, in agent actions (the same clock for both schedules).
    actions = iterations * EPISODES * n * ROUNDS
    config = TMFPGConfig().environment(
        env_class, env_config={"num_agents": n, "activation": schedule, "rounds": ROUNDS}) \
        .training(lr=[[0, 0.01], [actions, 0.002]], entropy_coeff=0.05,
                  num_episodes_per_iteration=EPISODES) \
        .debugging(seed=seed)
    return train(config, iterations, f"{env_class.__name__} {schedule}")


def equilibrium(env_class, n: int, schedule: str) -> tuple[float, float]:
    """Exact value J and regularised gap of the tau = 0.05 equilibrium of one schedule's
    mean-field game (fictitious play on time-indexed tables: a reference, not TMF-PG)."""
    from envs.mean_field.model import fixed_point_equilibrium, time_indexed_policy

    env = env_class({"num_agents": n, "activation": schedule, "rounds": ROUNDS})
    model = env.mean_field_model()
    tables, gap = fixed_point_equilibrium(model, 0.05, iterations=600, damping=0.1)
    return model.evaluate(time_indexed_policy(tables)).value, gap


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 20, resource game, 15 its")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    init_ray()
    n = 20 if args.quick else 50
    iterations = 15 if args.quick else 40
    games = {"resource_selection": ResourceSelectionEnv}
    if not args.quick:
        games["queueing"] = DynamicQueueingEnv

    flat, rows, histories = {"num_agents": n, "iterations": iterations}, [], {}
    for game_name, env_class in games.items():
        finals = {}
        for schedule in SCHEDULES:
            history = run(env_class, n, schedule, iterations, seed=0)
            histories[(game_name, schedule)] = history
            last = history[-5:]
            reference, reference_gap = equilibrium(env_class, n, schedule)
            finals[schedule] = {
                "equilibrium_value": reference,
                "equilibrium_regularized_gap": reference_gap,
                "return_per_agent": float(np.mean([r["return_per_agent"] for r in last])),
                "exploitability": float(np.mean([r["exploitability"] for r in last])),
                "value": float(np.mean([r["value"] for r in last])),
                "initial_exploitability": history[0]["exploitability"],
                "seconds": history[-1]["seconds"],
                "env_steps": history[-1]["env_steps"],
            }
        sync, seq = finals["all"], finals["sequential"]
        scale = 0.5 * (sync["initial_exploitability"] + seq["initial_exploitability"])
        return_gap = abs(seq["return_per_agent"] - sync["return_per_agent"]) \
            / abs(sync["return_per_agent"])
        exploitability_gap = abs(seq["exploitability"] - sync["exploitability"]) / scale
        for schedule, final in finals.items():
            for key, value in final.items():
                flat[f"{game_name}_{schedule}_{key}"] = round(value, 4)
        flat[f"{game_name}_return_relative_gap"] = round(return_gap, 4)
        for schedule, final in finals.items():
            flat[f"{game_name}_{schedule}_value_gap_to_equilibrium"] = round(
                abs(final["value"] - final["equilibrium_value"])
                / abs(final["equilibrium_value"]), 4)
        flat[f"{game_name}_equilibrium_value_relative_gap_between_schedules"] = round(
            abs(seq["equilibrium_value"] - sync["equilibrium_value"])
            / abs(sync["equilibrium_value"]), 4)
        flat[f"{game_name}_exploitability_gap_relative_to_initial"] = round(exploitability_gap,
                                                                            4)
        flat[f"{game_name}_goal_within_5pct"] = bool(return_gap <= 0.05
                                                     and exploitability_gap <= 0.05)
        rows.append((game_name, sync, seq, return_gap, exploitability_gap))

    table = ["| game | schedule | env steps | return / agent | exploitability (start -> end) | "
             "exact J | equilibrium J | train time |", "|---|---|---|---|---|---|---|---|"]
    for game_name, sync, seq, return_gap, exploitability_gap in rows:
        for schedule, final in (("all", sync), ("sequential", seq)):
            table.append(
                f"| {game_name} | {schedule} | {final['env_steps']:,} | "
                f"{final['return_per_agent']:.3f} | {final['initial_exploitability']:.3f} -> "
                f"{final['exploitability']:.3f} | {final['value']:.3f} | "
                f"{final['equilibrium_value']:.3f} | {final['seconds']:.0f}s |")
        eq_gap = abs(seq["equilibrium_value"] - sync["equilibrium_value"]) \
            / abs(sync["equilibrium_value"])
        table.append(f"| {game_name} | gap | | {100 * return_gap:.1f}% | "
                     f"{100 * exploitability_gap:.1f}% of start | | {100 * eq_gap:.1f}% | |")
    notes = [
        f"N = {n} agents, rounds = 10 (all: H = 10 env steps of {n} actions; sequential: "
        f"H = {10 * n} env steps of 1 action), 4 episodes per iteration, {iterations} "
        "iterations, lr 0.01 -> 0.002 (linear in agent actions), entropy 0.05, [64, 64] "
        "policy on [onehot(o), mu], seed 0.",
        "End values are means over the last 5 iterations; exploitability is exact (mean-field "
        "model of each schedule), the return is sampled from the N-agent episodes.",
        "The two schedules are different games in the mean-field limit (discrete map vs "
        "near-continuous-time flow), so their equilibria, and returns, need not coincide. "
        "`equilibrium J` is the exact value of each schedule's tau = 0.05 equilibrium "
        "(fictitious play on time-indexed policy tables, a reference solution): where the "
        "returns differ between schedules, compare each run with its own equilibrium.",
        "Sequential training is slower per agent action because RLlib does one env step, "
        "connector pass and module call per acting agent.",
    ]
    write_results(NAME, flat, "TMF-PG: one agent per step vs all N per step (same N)",
                  "\n".join(table), notes, args.quick)
    plot(histories, games)
    return 0


def plot(histories, games) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(games), figsize=(5.5 * len(games), 7), squeeze=False)
    for column, game_name in enumerate(games):
        for schedule, style in zip(SCHEDULES, ("o-", "s--")):
            history = histories[(game_name, schedule)]
            iterations = [r["iteration"] for r in history]
            axes[0][column].plot(iterations, [r["exploitability"] for r in history], style,
                                 ms=3, label=schedule)
            axes[1][column].plot(iterations, [r["return_per_agent"] for r in history], style,
                                 ms=3, label=schedule)
        axes[0][column].set_title(f"{game_name}: exploitability (exact)")
        axes[1][column].set_title(f"{game_name}: return per agent (sampled)")
        for ax in axes[:, column]:
            ax.set_xlabel("iteration (same agent experience per iteration)")
            ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
