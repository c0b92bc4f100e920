"""Shared pieces of the TMF benches: Ray start-up, the TMF-PG training loop, exact metrics
(result files and the machine line come from common.py)."""

from __future__ import annotations

import os
import time


def init_ray() -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)


def train(config, iterations: int, label: str) -> list[dict]:
    """Build ``config`` and train; one row per iteration with the exact-model and runner
    metrics (TMF-PG's own, or the mean-field callback's for other algorithms)."""
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
            metrics = result.get("mean_field") or exact_metrics(algo)
            row.update(metrics)
            rows.append(row)
            print(f"[{label}] iter {row['iteration']}: exploitability "
                  f"{row['exploitability']:.3f}, return/agent {row['return_per_agent']:.3f}, "
                  f"{row['seconds']:.0f}s", flush=True)
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
