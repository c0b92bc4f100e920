"""TMF-PG with one agent acting per step vs all N acting (the paper's first claim), the
unregularised exploitability TMF-PG reaches, and the inner-loop length.

TMF-PG is trained through RLlib (TMFPG Algorithm, MultiAgentEnvRunner, the learner) on the
same game with the same N, once with ``activation: all`` and once with ``sequential``. An
env step lasts alpha rounds (1 vs 1/N), so both play the same game in time: each customer
decides about once per round, queues serve and receive work at the same rates per round.
Both runs sample the same number of complete episodes per iteration, each with about
N * rounds agent actions, so both see the same amount of agent experience. Reported (mean of
the last 5 iterations):

* return per agent (sampled population episodes, total reward / N);
* exploitability of the learned policy in the exact mean-field model of its schedule
  (alpha = 1 vs 1/N; unregularised, the mu_0-weighted summary), and its last value;
* each schedule's exact equilibrium value from the OMD solver, with its gap and whether it
  converged (a point that did not is not reported as an equilibrium value).

Goals: (a) return and exploitability within 5% between the schedules (the exploitability
difference relative to the uniform policy's, since both end near 0); (c) unregularised
exploitability <= 1e-2. The same comparison is repeated with exact-model TMF-PG
(``exact.py``: trained on each schedule's N -> infinity model, no sampling, no finite-N
bias), and a last table runs it with 1 and 5 inner steps per flow estimate at the same number
of gradient steps.

Both trainers anneal: lr 0.01 -> 0.001 over the run and, on queueing, the entropy
coefficient tau 0.3 -> 0 over the first 70% of it (``tmf_common.TAU``; plain softmax policy gradient
with the network stalls near a deterministic, non-equilibrium policy there, see
``docs/tmf_pg.md``); the reported exploitability is always the unregularised one, and the
last 30% of the run optimise the plain game. On resource selection the env shows the policy
mu magnified around uniform (``mu_scale`` 10, ``MU_SCALE``): on raw mu the one-acting exact
run plateaus at exploitability ~0.014.

    .venv/bin/python bench/tmf_sequential_vs_synchronous.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402
from tmf_common import ANNEAL_END, LR, TAU, init_ray, schedules, train  # noqa: E402

from envs.mean_field import DynamicQueueingEnv, ResourceSelectionEnv  # noqa: E402
from rllib_ext.algorithms.tmf_pg import TMFPGConfig  # noqa: E402

NAME = "tmf_sequential_vs_synchronous"
SCHEDULES = ("all", "sequential")
ROUNDS = 10
EPISODES = 4
# Queueing's exact runs at 1000 steps (tau 0.3 -> 0 at 70%) ended below 1e-2 on one machine
# (init seeds 0-3) and at 0.028 / 0.002 / 0.043 / 0.003 on another (AMD EPYC, the same code):
# half the seeds stall near a deterministic policy. 2000 steps with the same schedule shape
# end at 0.0011 / 0.0026 / 0.0005 / 0.0005 there.
EXACT_ITERATIONS = 2000
GAMES = {"resource_selection": ResourceSelectionEnv, "queueing": DynamicQueueingEnv}
# The env's mu_scale per game. Resource selection's policy must resolve moves of mu by a few
# hundredths (one agent acting, 1000 exact steps: a [64, 64] net plateaus at exploitability
# ~0.014 on raw mu and reaches 0.002-0.004 with s = 10); on queueing magnifying mu made the
# exact runs worse (all acting: 0.005-0.014 over 4 seeds against 0.001-0.002).
MU_SCALE = {"resource_selection": 10.0, "queueing": 1.0}


def env_config(game_name: str, n: int, schedule: str) -> dict:
    return {"num_agents": n, "activation": schedule, "rounds": ROUNDS,
            "mu_scale": MU_SCALE[game_name]}


def run(game_name: str, n: int, schedule: str, iterations: int, seed: int) -> list[dict]:
    # Schedules in agent actions (the same clock for both schedules).
    actions = iterations * EPISODES * n * ROUNDS
    env_class, tau = GAMES[game_name], TAU[game_name]
    config = TMFPGConfig().environment(
        env_class, env_config=env_config(game_name, n, schedule)) \
        .training(**schedules(actions, tau), num_episodes_per_iteration=EPISODES) \
        .debugging(seed=seed)
    return train(config, iterations, f"{env_class.__name__} {schedule}")


def equilibrium(env_class, n: int, schedule: str) -> dict:
    """The exact (unregularised) equilibrium of one schedule's mean-field game by the OMD
    solver (a reference, not TMF-PG): its value only if the solver converged."""
    from envs.mean_field.model import solve_equilibrium

    env = env_class({"num_agents": n, "activation": schedule, "rounds": ROUNDS})
    model = env.mean_field_model()
    start = time.perf_counter()
    result = solve_equilibrium(model, tol=1e-4, max_iterations=4000, learning_rate=0.3)
    value = model.evaluate(result.policy()).value if result.converged else float("nan")
    print(f"[{env_class.__name__} {schedule}] equilibrium: converged {result.converged}, "
          f"gap {result.exploitability:.2e}, {result.iterations} its, "
          f"{time.perf_counter() - start:.0f}s", flush=True)
    return {"equilibrium_value": value, "equilibrium_gap": result.exploitability,
            "equilibrium_converged": result.converged}


def build_module(env):
    import torch
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rllib_ext.algorithms.tmf_pg.torch.tmf_pg_torch_rl_module import TMFPGTorchRLModule

    torch.manual_seed(0)
    return RLModuleSpec(module_class=TMFPGTorchRLModule,
                        observation_space=env.observation_spaces["agent_0"],
                        action_space=env.action_spaces["agent_0"],
                        model_config={"hidden": [64, 64]}).build()


def exact_run(game_name: str, n: int, schedule: str, iterations: int) -> dict:
    """Exact-model TMF-PG (inner_updates 1, Adam, the run's lr and tau schedules in gradient
    steps) on one schedule's model: J and exploitability of the final policy."""
    from rllib_ext.algorithms.tmf_pg.exact import exact_tmf_pg

    env_class, tau = GAMES[game_name], TAU[game_name]
    env = env_class(env_config(game_name, n, schedule))
    start = time.perf_counter()
    history = exact_tmf_pg(env.mean_field_model(), build_module(env), env.policy_inputs,
                           iterations=iterations, **schedules(iterations, tau),
                           evaluate_every=max(iterations // 6, 1))
    print(f"[exact {env_class.__name__} {schedule}] {history[-1]}, "
          f"{time.perf_counter() - start:.0f}s", flush=True)
    return {"value": history[-1]["value"], "exploitability": history[-1]["exploitability"],
            "initial_exploitability": history[0]["exploitability"],
            "max_gap": history[-1]["max_gap"],
            "curve": [(row["iteration"], row["exploitability"]) for row in history]}


def inner_loop_study(steps: int) -> list[tuple]:
    """Exact-model TMF-PG, all agents acting (N = 50 model), inner_updates 1 vs 5 at the same
    number of gradient steps: (game, inner, lr, exploitability after half, at the end)."""
    from rllib_ext.algorithms.tmf_pg.exact import exact_tmf_pg

    rows = []
    for game_name, env_class in GAMES.items():
        env = env_class(env_config(game_name, 50, "all"))
        for inner, lr in ((1, 0.01), (5, 0.01), (5, 0.002)):
            outer = steps // inner
            history = exact_tmf_pg(env.mean_field_model(), build_module(env), env.policy_inputs,
                                   iterations=outer, lr=lr, inner_updates=inner,
                                   evaluate_every=outer // 2)
            rows.append((game_name, inner, lr, history[1]["exploitability"],
                         history[-1]["exploitability"]))
            print("inner-loop study", rows[-1], flush=True)
    return rows


def claims(prefix: str, sync: dict, seq: dict, return_key: str,
           final_key: str) -> tuple[float, float, dict]:
    """One agent acting vs all acting: the return gap |R_one - R_all| / |R_all|, the
    exploitability gap |e_one - e_all| / (mean initial exploitability), and the goals' flags:
    (a) both gaps <= 5%, (c) both final exploitabilities (``final_key``) <= 1e-2."""
    return_gap = abs(seq[return_key] - sync[return_key]) / abs(sync[return_key])
    scale = 0.5 * (sync["initial_exploitability"] + seq["initial_exploitability"])
    exploitability_gap = abs(seq["exploitability"] - sync["exploitability"]) / scale
    return return_gap, exploitability_gap, {
        f"{prefix}_goal_a_within_5pct": bool(return_gap <= 0.05 and exploitability_gap <= 0.05),
        f"{prefix}_goal_c_exploitability_at_most_0.01": bool(
            max(sync[final_key], seq[final_key]) <= 0.01)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 20, resource game, 12 its")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    init_ray()
    n = 20 if args.quick else 50
    iterations = 12 if args.quick else 60
    exact_iterations = 30 if args.quick else EXACT_ITERATIONS
    games = {"resource_selection": ResourceSelectionEnv} if args.quick else GAMES

    flat, rows, histories = {"num_agents": n, "iterations": iterations,
                             "exact_iterations": exact_iterations,
                             **{f"{game}_tau_start": tau for game, tau in TAU.items()}}, [], {}
    for game_name, env_class in games.items():
        finals = {}
        for schedule in SCHEDULES:
            history = run(game_name, n, schedule, iterations, seed=0)
            histories[(game_name, schedule)] = history
            last = history[-5:]
            finals[schedule] = {
                **equilibrium(env_class, n, schedule),
                "return_per_agent": float(np.mean([r["return_per_agent"] for r in last])),
                "exploitability": float(np.mean([r["exploitability"] for r in last])),
                "final_exploitability": history[-1]["exploitability"],
                "final_max_gap": history[-1]["max_gap"],
                "value": float(np.mean([r["value"] for r in last])),
                "initial_exploitability": history[0]["exploitability"],
                "seconds": history[-1]["seconds"],
                "env_steps": history[-1]["env_steps"],
            }
        sync, seq = finals["all"], finals["sequential"]
        return_gap, exploitability_gap, goals = claims(game_name, sync, seq, "return_per_agent",
                                                       "final_exploitability")
        equilibrium_gap = abs(seq["equilibrium_value"] - sync["equilibrium_value"]) \
            / abs(sync["equilibrium_value"])
        for schedule, final in finals.items():
            for key, value in final.items():
                flat[f"{game_name}_{schedule}_{key}"] = value if isinstance(value, bool) \
                    else round(value, 5)
        flat[f"{game_name}_return_relative_gap"] = round(return_gap, 4)
        flat[f"{game_name}_exploitability_gap_relative_to_initial"] = round(exploitability_gap,
                                                                            4)
        flat[f"{game_name}_equilibrium_value_relative_gap_between_schedules"] = round(
            equilibrium_gap, 4)
        flat.update(goals)
        rows.append((game_name, sync, seq, return_gap, exploitability_gap, equilibrium_gap))

    exact_rows = []
    for game_name in games:
        runs = {schedule: exact_run(game_name, n, schedule, exact_iterations)
                for schedule in SCHEDULES}
        sync, seq = runs["all"], runs["sequential"]
        return_gap, exploitability_gap, goals = claims(f"exact_{game_name}", sync, seq, "value",
                                                       "exploitability")
        for schedule, run_ in runs.items():
            for key, value in run_.items():
                if key != "curve":
                    flat[f"exact_{game_name}_{schedule}_{key}"] = round(value, 5)
        flat[f"exact_{game_name}_value_relative_gap"] = round(return_gap, 4)
        flat[f"exact_{game_name}_exploitability_gap_relative_to_initial"] = round(
            exploitability_gap, 4)
        flat.update(goals)
        exact_rows.append((game_name, sync, seq, return_gap, exploitability_gap))

    study = inner_loop_study(20 if args.quick else 300)
    for game_name, inner, lr, _, end in study:
        flat[f"inner_study_{game_name}_inner{inner}_lr{lr:g}_exploitability"] = round(end, 5)

    def equilibrium_cell(final):
        if not final["equilibrium_converged"]:
            return f"not converged (gap {final['equilibrium_gap']:.1e})"
        return f"{final['equilibrium_value']:.3f}"

    table = ["| game | schedule | env steps | return / agent | exploitability (start -> last 5 "
             "-> last) | exact J | equilibrium J (OMD) | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for game_name, sync, seq, return_gap, exploitability_gap, equilibrium_gap in rows:
        for schedule, final in (("all", sync), ("sequential", seq)):
            table.append(
                f"| {game_name} | {schedule} | {final['env_steps']:,} | "
                f"{final['return_per_agent']:.3f} | {final['initial_exploitability']:.3f} -> "
                f"{final['exploitability']:.4f} -> {final['final_exploitability']:.4f} | "
                f"{final['value']:.3f} | {equilibrium_cell(final)} | {final['seconds']:.0f}s |")
        table.append(f"| {game_name} | gap | | {100 * return_gap:.1f}% | "
                     f"{100 * exploitability_gap:.1f}% of start | | "
                     f"{100 * equilibrium_gap:.1f}% | |")
    table += ["", f"Exact-model TMF-PG (N -> infinity model of each schedule, alpha = 1 vs "
              f"1/{n}), {exact_iterations} iterations of one gradient step:", "",
              "| game | schedule | tau start | exploitability along the run (iteration: value) "
              "| max per-state gap | J |",
              "|---|---|---|---|---|---|"]
    for game_name, sync, seq, return_gap, exploitability_gap in exact_rows:
        for schedule, final in (("all", sync), ("sequential", seq)):
            curve = ", ".join(f"{it}: {value:.4f}" for it, value in final["curve"])
            table.append(f"| {game_name} | {schedule} | {TAU[game_name]:g} | {curve} | "
                         f"{final['max_gap']:.3f} | {final['value']:.4f} |")
        table.append(f"| {game_name} | gap | | {100 * exploitability_gap:.2f}% of start | | "
                     f"{100 * return_gap:.2f}% |")
    table += ["", "Exact-model TMF-PG, all agents acting, same number of gradient steps:", "",
              "| game | inner_updates | lr (Adam) | exploitability at half | at the end |",
              "|---|---|---|---|---|"]
    table += [f"| {g} | {inner} | {lr:g} | {half:.4f} | {end:.4f} |"
              for g, inner, lr, half, end in study]
    notes = [
        f"N = {n} agents, rounds = {ROUNDS} (all: H = {ROUNDS} env steps of {n} actions; "
        f"sequential: H = {ROUNDS * n} env steps of 1 action, each 1/{n} of a round), "
        f"{EPISODES} episodes per iteration, {iterations} iterations, inner_updates 1, "
        f"lr {LR[0]} -> {LR[1]} (linear in agent actions), entropy coefficient "
        f"{', '.join(f'{g} {t:g}' for g, t in TAU.items())} annealed linearly to 0 at "
        f"{ANNEAL_END:.0%} of the run (the exact-model runs: the same schedules over their "
        "gradient steps), [64, 64] policy on [onehot(o), mu'] with mu' = 1/O + s (mu - 1/O), "
        f"the env's mu_scale s: {', '.join(f'{g} {v:g}' for g, v in MU_SCALE.items())}; "
        "seed 0.",
        "Exploitability is exact and unregularised (mean-field model of each schedule, "
        "sum_o mu_0(o) (W* - W^pi)_0(o)); the return is sampled from the N-agent episodes. "
        "`last 5` is the mean of the last five iterations, `last` the final policy.",
        "Equilibrium J: online mirror descent on time-indexed policy tables until the "
        "exploitability is <= 1e-4 (at most 4000 iterations, step 0.3); a run that stops above "
        "the tolerance is reported as not converged, without a value.",
        "Queueing starts with customers spread evenly over the queues and each queue's "
        "backlogs in their steady state (`uniform_queues_steady`); from a start far from "
        "steady state the two schedules weigh the initial transient differently (all: the "
        "first costs are paid at t = 0).",
        "Sequential training is slower per agent action because RLlib does one env step, "
        "connector pass and module call per acting agent.",
        "The 2-core machine was shared with other jobs during the run.",
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
            axes[0][column].semilogy(iterations, [r["exploitability"] for r in history],
                                     style, ms=3, label=schedule)
            axes[1][column].plot(iterations, [r["return_per_agent"] for r in history], style,
                                 ms=3, label=schedule)
        axes[0][column].axhline(0.01, color="k", lw=0.8, ls=":", label="0.01")
        axes[0][column].set_title(f"{game_name}: exploitability (exact, unregularised)")
        axes[1][column].set_title(f"{game_name}: return per agent (sampled)")
        for ax in axes[:, column]:
            ax.set_xlabel("iteration (same agent experience per iteration)")
            ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
