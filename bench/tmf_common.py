"""Shared pieces of the TMF benches: Ray start-up, the TMF-PG training loop, exact metrics
(result files and the machine line come from common.py)."""

from __future__ import annotations

import os
import time

# TMF-PG's schedules in the benches: lr LR[0] -> LR[1] over the run; the entropy coefficient
# starts at TAU[game] and falls linearly to 0 at ANNEAL_END of the run (0: no entropy term).
# Queueing needs it: plain softmax policy gradient with the network stalls there near a
# deterministic policy that is not an equilibrium (docs/tmf_pg.md).
LR = (0.01, 0.001)
TAU = {"resource_selection": 0.0, "queueing": 0.3}
ANNEAL_END = 0.7


def schedules(steps: int, tau: float) -> dict:
    """TMF-PG's ``lr`` and ``entropy_coeff`` as [[t, value], ...] over ``steps`` (agent
    actions for RLlib, gradient steps for ``exact_tmf_pg``)."""
    return {"lr": [[0, LR[0]], [steps, LR[1]]],
            "entropy_coeff": [[0, tau], [int(ANNEAL_END * steps), 0.0]] if tau else 0.0}


def init_ray() -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)


def train(config, iterations: int, label: str, evaluate_every: int = 1) -> list[dict]:
    """Build ``config`` and train; one row per iteration with the runner metrics and, at the
    first, every ``evaluate_every``-th and the last iteration, the exact-model metrics
    (TMF-PG's own, or the mean-field callback's for other algorithms)."""
    algo = config.build_algo()
    rows = []
    start = time.perf_counter()
    try:
        for _ in range(iterations):
            result = algo.train()
            runner = result["env_runners"]
            row = {
                "iteration": result["training_iteration"],
                "seconds": time.perf_counter() - start,
                "env_steps": runner.get("num_env_steps_sampled_lifetime", 0),
                "return_per_agent": runner.get("mean_field", {}).get("return_per_agent"),
                "mu_l1_distance": runner.get("mean_field", {}).get("mu_l1_distance"),
            }
            if row["iteration"] in (1, iterations) or row["iteration"] % evaluate_every == 0:
                row.update(result.get("mean_field") or exact_metrics(algo))
                print(f"[{label}] iter {row['iteration']}: exploitability "
                      f"{row['exploitability']:.3f}, return/agent "
                      f"{row['return_per_agent']:.3f}, {row['seconds']:.0f}s", flush=True)
            rows.append(row)
    finally:
        algo.stop()
    return rows


def exact_metrics(algo) -> dict:
    """Exploitability and value of any RLlib algorithm's modules on a mean-field env."""
    from ray.rllib.env.env_context import EnvContext

    from rllib_ext.algorithms.tmf_pg.population import PopulationView

    env = algo.env_creator(EnvContext(algo.config.env_config, worker_index=0))
    view = PopulationView(env, algo.config.policy_mapping_fn)
    modules = {mid: algo.get_module(mid) for mid in view.module_ids}
    evaluation = view.evaluate(modules)
    return {"exploitability": evaluation.exploitability, "max_gap": evaluation.max_gap,
            "value": evaluation.value}
