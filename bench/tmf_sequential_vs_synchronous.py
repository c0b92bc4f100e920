"""TMF-PG with one agent acting per step vs all N acting (the paper's first claim), the
unregularised exploitability TMF-PG reaches, and the inner-loop length.

TMF-PG is trained through RLlib (TMFPG Algorithm, MultiAgentEnvRunner, the learner) on the
same game with the same N, once with ``activation: all`` and once with ``sequential``. An
env step lasts alpha rounds (1 vs 1/N), so both play the same game in time: each customer
decides about once per round, queues serve and receive work at the same rates per round.
Both runs sample the same number of complete episodes per iteration, each with about
N * rounds agent actions, so both see the same amount of agent experience. Each schedule
runs with several seeds; reported per run as means over its last 20% (``TAIL``), then mean
and standard deviation over the seeds:

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

Both trainers anneal lr 0.01 -> 0.001 over the run. The exact-model runs on queueing also
anneal the entropy coefficient tau 0.3 -> 0 over the first 70% of it (``tmf_common.TAU``;
plain softmax policy gradient with the network stalls near a deterministic, non-equilibrium
policy there, see ``docs/tmf_pg.md``); the sampled runs use no entropy term
(``SAMPLED_TAU``). The reported exploitability is always the unregularised one. On resource selection the env shows the policy
mu magnified around uniform (``mu_scale`` 10, ``MU_SCALE``): on raw mu the one-acting exact
run plateaus at exploitability ~0.014.

    .venv/bin/python bench/tmf_sequential_vs_synchronous.py [--quick]   # full: ~1 h
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
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
# Sampled runs: gradient steps, the seeds, exact metrics every EVALUATE_EVERY iterations, and
# the summaries' window (the last TAIL of the run): at N = 50 the final policies keep moving
# by sampling noise (exploitability 0.05-0.2 from one evaluation to the next on resource
# selection), so one evaluation, or one seed, does not tell two schedules apart.
ITERATIONS = 300
SEEDS = (0, 1, 2)
EVALUATE_EVERY = 10
TAIL = 0.2
# No entropy term in the sampled runs. Queueing with tau 0.3 -> 0 (the exact runs' setting)
# ended, seed 0 after 300 iterations, at exploitability 0.65 with all acting against 0.29
# with one: the annealing phase costs the short sampled runs most of their steps. With
# tau = 0: 0.30 and 0.28.
SAMPLED_TAU = 0.0
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


def run(game_name: str, n: int, schedule: str, iterations: int, seed: int,
        evaluate_every: int) -> list[dict]:
    """Sampled TMF-PG through RLlib (its own Ray instance: runs go two at a time)."""
    init_ray()
    # Schedules in agent actions (the same clock for both schedules).
    actions = iterations * EPISODES * n * ROUNDS
    env_class = GAMES[game_name]
    config = TMFPGConfig().environment(
        env_class, env_config=env_config(game_name, n, schedule)) \
        .training(**schedules(actions, SAMPLED_TAU), num_episodes_per_iteration=EPISODES,
                  exploitability_interval=evaluate_every) \
        .debugging(seed=seed)
    return train(config, iterations, f"{env_class.__name__} {schedule} seed {seed}",
                 evaluate_every)


def one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def summary(history: list[dict]) -> dict:
    """One sampled run: means over its last TAIL of the return per agent (every iteration)
    and of the exploitability and exact J (its evaluations), the first and last evaluation."""
    tail = history[-max(1, round(TAIL * len(history))):]
    evaluated = [row for row in tail if "exploitability" in row]
    return {
        "return_per_agent": float(np.mean([row["return_per_agent"] for row in tail])),
        "exploitability": float(np.mean([row["exploitability"] for row in evaluated])),
        "value": float(np.mean([row["value"] for row in evaluated])),
        "final_exploitability": history[-1]["exploitability"],
        "final_max_gap": history[-1]["max_gap"],
        "initial_exploitability": history[0]["exploitability"],
        "seconds": history[-1]["seconds"],
        "env_steps": history[-1]["env_steps"],
    }


def over_seeds(summaries: list[dict]) -> dict:
    """Mean over seeds of every summary figure, and the seeds' standard deviation of the
    return and the exploitability (``*_sd``)."""
    merged = {key: float(np.mean([s[key] for s in summaries])) for key in summaries[0]}
    for key in ("return_per_agent", "exploitability"):
        merged[f"{key}_sd"] = float(np.std([s[key] for s in summaries]))
    return merged


def equilibrium(game_name: str, n: int, schedule: str) -> dict:
    """The exact (unregularised) equilibrium of one schedule's mean-field game by the OMD
    solver (a reference, not TMF-PG): its value only if the solver converged."""
    from envs.mean_field.model import solve_equilibrium

    env_class = GAMES[game_name]
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
    parser.add_argument("--quick", action="store_true",
                        help="N = 20, resource game, 12 its, one seed")
    args = parser.parse_args(argv)
    one_torch_thread()  # as in the workers (and the machine line says so)
    n = 20 if args.quick else 50
    iterations = 12 if args.quick else ITERATIONS
    seeds = SEEDS[:1] if args.quick else SEEDS
    evaluate_every = 3 if args.quick else EVALUATE_EVERY
    exact_iterations = 30 if args.quick else EXACT_ITERATIONS
    games = {"resource_selection": ResourceSelectionEnv} if args.quick else GAMES

    # Every run is independent: two at a time (the machine's cores), the longest first.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context,
                             initializer=one_torch_thread) as pool:
        exact = {(game, schedule): pool.submit(exact_run, game, n, schedule, exact_iterations)
                 for schedule in reversed(SCHEDULES) for game in games}
        sampled = {(game, schedule, seed): pool.submit(run, game, n, schedule, iterations,
                                                       seed, evaluate_every)
                   for schedule in reversed(SCHEDULES) for game in games for seed in seeds}
        solved = {(game, schedule): pool.submit(equilibrium, game, n, schedule)
                  for game in games for schedule in SCHEDULES}
        study_future = pool.submit(inner_loop_study, 20 if args.quick else 300)
        histories = {key: future.result() for key, future in sampled.items()}
        exact = {key: future.result() for key, future in exact.items()}
        solved = {key: future.result() for key, future in solved.items()}
        study = study_future.result()

    flat = {"num_agents": n, "iterations": iterations, "seeds": len(seeds),
            "sampled_tau": SAMPLED_TAU,
            "exact_iterations": exact_iterations,
            **{f"{game}_tau_start": tau for game, tau in TAU.items()}}
    rows = []
    for game_name in games:
        finals = {schedule: {**solved[(game_name, schedule)], **over_seeds(
            [summary(histories[(game_name, schedule, seed)]) for seed in seeds])}
            for schedule in SCHEDULES}
        for schedule in SCHEDULES:
            for seed in seeds:
                history = histories[(game_name, schedule, seed)]
                one = summary(history)
                flat[f"{game_name}_{schedule}_seed{seed}_return_per_agent"] = round(
                    one["return_per_agent"], 5)
                flat[f"{game_name}_{schedule}_seed{seed}_exploitability"] = round(
                    one["exploitability"], 5)
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
        runs = {schedule: exact[(game_name, schedule)] for schedule in SCHEDULES}
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

    for game_name, inner, lr, _, end in study:
        flat[f"inner_study_{game_name}_inner{inner}_lr{lr:g}_exploitability"] = round(end, 5)

    def equilibrium_cell(final):
        if not final["equilibrium_converged"]:
            return f"not converged (gap {final['equilibrium_gap']:.1e})"
        return f"{final['equilibrium_value']:.3f}"

    table = [f"Sampled TMF-PG through RLlib, N = {n}, mean +- sd over {len(seeds)} seed(s); "
             f"return, exploitability and exact J are means over the last {TAIL:.0%} of each "
             "run:", "",
             "| game | schedule | env steps | return / agent | exploitability (start -> "
             "last part -> last) | exact J | equilibrium J (OMD) | train time per run |",
             "|---|---|---|---|---|---|---|---|"]
    for game_name, sync, seq, return_gap, exploitability_gap, equilibrium_gap in rows:
        for schedule, final in (("all", sync), ("sequential", seq)):
            table.append(
                f"| {game_name} | {schedule} | {final['env_steps']:,.0f} | "
                f"{final['return_per_agent']:.3f} +- {final['return_per_agent_sd']:.3f} | "
                f"{final['initial_exploitability']:.3f} -> {final['exploitability']:.4f} +- "
                f"{final['exploitability_sd']:.4f} -> {final['final_exploitability']:.4f} | "
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
        f"lr {LR[0]} -> {LR[1]} (linear in agent actions; the exact-model runs: over their "
        f"gradient steps), entropy coefficient: sampled runs {SAMPLED_TAU:g}, exact-model "
        f"runs {', '.join(f'{g} {t:g}' for g, t in TAU.items())} annealed linearly to 0 at "
        f"{ANNEAL_END:.0%} of the run, [64, 64] policy on [onehot(o), mu'] with mu' = 1/O + s (mu - 1/O), "
        f"the env's mu_scale s: {', '.join(f'{g} {v:g}' for g, v in MU_SCALE.items())}; "
        f"sampled runs: seeds {', '.join(map(str, seeds))}, exact metrics every "
        f"{evaluate_every} iterations.",
        "Exploitability is exact and unregularised (mean-field model of each schedule, "
        "sum_o mu_0(o) (W* - W^pi)_0(o)); the return is sampled from the N-agent episodes. "
        f"`last part` is the mean over the evaluations in the last {TAIL:.0%} of a run, "
        "`last` the final policy's (both then averaged over the seeds). Runs go two at a time "
        "(one process each), so the train times include sharing the 2 cores.",
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
    plot(histories, games, seeds)
    return 0


def plot(histories, games, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(games), figsize=(5.5 * len(games), 7), squeeze=False)
    for column, game_name in enumerate(games):
        for schedule, color in zip(SCHEDULES, ("tab:blue", "tab:orange")):
            for seed in seeds:
                history = histories[(game_name, schedule, seed)]
                evaluated = [r for r in history if "exploitability" in r]
                label = schedule if seed == seeds[0] else None
                axes[0][column].semilogy([r["iteration"] for r in evaluated],
                                         [r["exploitability"] for r in evaluated], "o-",
                                         color=color, ms=2, lw=0.8, label=label)
                axes[1][column].plot([r["iteration"] for r in history],
                                     [r["return_per_agent"] for r in history], color=color,
                                     lw=0.6, alpha=0.7, label=label)
        axes[0][column].axhline(0.01, color="k", lw=0.8, ls=":", label="0.01")
        axes[0][column].set_title(f"{game_name}: exploitability (exact, unregularised)")
        axes[1][column].set_title(f"{game_name}: return per agent (sampled)")
        for ax in axes[:, column]:
            ax.set_xlabel("iteration (same agent experience per iteration), one line per seed")
            ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
