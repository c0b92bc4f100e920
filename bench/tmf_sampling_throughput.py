"""TMF-PG's sampling through RLlib: agent actions per second of ``MeanFieldEnvRunner.sample``.

Three runners sample the same iterations (4 complete population episodes per call, as TMF-PG
does) with the same module:

* ``RLlib episodes, 1 env``: RLlib's ``MultiAgentEpisode`` (it re-validates all N agents'
  episodes and searches all N agents' histories for those to act at every env step) and one
  env per runner: the sampler before this change;
* ``population episodes, 1 env``: :class:`PopulationEpisode` (O(acting agents) per step);
* ``population episodes, 4 envs``: the same with TMF-PG's default 4 envs side by side (one
  env-to-module pass and one module forward per env step for all four).

Throughput = agent actions (acting agents x env steps) per second of ``sample()``, which
includes the env, RLlib's connectors, the module and the mean-field metrics of each finished
episode (their exact flow is computed once per policy). With one agent acting per step
(``sequential``) the per-step costs are all there is.

    .venv/bin/python bench/tmf_sampling_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log_bar_groups, markdown_table, write_results  # noqa: E402

from envs.mean_field import DynamicQueueingEnv, ResourceSelectionEnv  # noqa: E402

NAME = "tmf_sampling_throughput"
EPISODES = 4
VARIANTS = ("RLlib episodes, 1 env", "population episodes, 1 env",
            "population episodes, 4 envs")


def runner_for(variant: str, env_class, env_config: dict):
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner

    from rllib_ext.algorithms.tmf_pg import TMFPGConfig
    from rllib_ext.algorithms.tmf_pg.env_runner import MeanFieldEnvRunner

    class RLlibEpisodeRunner(MeanFieldEnvRunner):
        _new_episode = MultiAgentEnvRunner._new_episode

    envs = 4 if variant.endswith("4 envs") else 1
    config = TMFPGConfig().environment(env_class, env_config=env_config) \
        .env_runners(num_envs_per_env_runner=envs).debugging(seed=0)
    config.validate()
    runner_class = RLlibEpisodeRunner if variant.startswith("RLlib") else MeanFieldEnvRunner
    return runner_class(config=config)


def actions_per_second(runner) -> float:
    started = time.perf_counter()
    episodes = runner.sample(num_episodes=EPISODES)
    seconds = time.perf_counter() - started
    return sum(episode.agent_steps() for episode in episodes) / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 20, 2 rounds, 2 repeats")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    repeats, rounds = (2, 2) if args.quick else (3, 10)
    sizes = (20,) if args.quick else (50, 100)
    rows, flat = [], {}
    for game_name, env_class in (("queueing", DynamicQueueingEnv),
                                 ("resource_selection", ResourceSelectionEnv)):
        for n in sizes:
            for schedule in ("sequential", "all"):
                env_config = {"num_agents": n, "activation": schedule, "rounds": rounds}
                runners = {v: runner_for(v, env_class, env_config) for v in VARIANTS}
                for runner in runners.values():  # warm-up: first forward, first flow
                    actions_per_second(runner)
                samples = {v: [] for v in VARIANTS}
                for _ in range(repeats):  # interleaved: machine noise hits all alike
                    for variant, runner in runners.items():
                        samples[variant].append(actions_per_second(runner))
                best = {v: max(s) for v, s in samples.items()}
                ratio = float(np.median(np.array(samples[VARIANTS[2]])
                                        / np.array(samples[VARIANTS[0]])))
                rows.append([game_name, n, schedule, *(f"{best[v]:,.0f}" for v in VARIANTS),
                             f"{ratio:.1f}x"])
                key = f"{game_name}_n{n}_{schedule}"
                for variant, short in zip(VARIANTS, ("rllib_episodes", "population_1env",
                                                     "population_4envs"), strict=True):
                    flat[f"{key}_{short}_actions_per_s"] = round(best[variant])
                flat[f"{key}_speedup"] = round(ratio, 2)
                print(rows[-1], flush=True)
                for runner in runners.values():
                    runner.stop()
    table = markdown_table(["game", "N", "activation", *(f"{v} (actions/s)" for v in VARIANTS),
                            "speedup (4 envs / RLlib episodes)"], rows)
    notes = [
        f"Each cell: `sample(num_episodes={EPISODES})` of complete episodes ({rounds} rounds: "
        "each agent acts about that many times), after one warm-up call; the best of "
        f"{repeats} interleaved calls; speedup = median of the per-call ratios.",
        "One torch thread, the local runner (TMF-PG's default), the [64, 64] policy of TMF-PG's "
        "default module, untrained.",
        "What remains per env step with one agent acting: RLlib's env-to-module and "
        "module-to-env connectors, one module forward, the env's step (queueing moves the idle "
        "customers too: O(N) per step) and RLlib's per-step metrics.",
    ]
    write_results(NAME, flat, "TMF-PG sampling through RLlib: agent actions per second",
                  table, notes, args.quick)
    plot(rows)
    return 0


def plot(rows) -> None:
    log_bar_groups(NAME, [f"{g[:9]}\nN={n}\n{s}" for g, n, s, *_ in rows],
                   {variant: [float(r[column].replace(",", "")) for r in rows]
                    for column, variant in enumerate(VARIANTS, start=3)},
                   "agent actions / s of sample()", "TMF-PG sampling through RLlib", (10, 4.5))


if __name__ == "__main__":
    raise SystemExit(main())
