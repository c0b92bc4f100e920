"""Shared pieces of the TMF benches: result files, machine line, TMF-PG training loop."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import numpy
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
            f"Python {platform.python_version()}, numpy {numpy.__version__}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)")


def write_results(name: str, flat: dict, title: str, table: str, notes: list[str],
                  quick: bool) -> None:
    """Write ``results/<name>.json`` (flat headline dict) and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    flat = {"machine": machine(), "date": datetime.date.today().isoformat(), "quick": quick,
            **flat}
    (RESULTS / f"{name}.json").write_text(json.dumps(flat, indent=1) + "\n")
    lines = [f"# {title}", "",
             f"{flat['date']}, {flat['machine']}{', --quick' if quick else ''}.", "",
             table, ""]
    lines += [f"- {note}" for note in notes]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / name}.{{json,md,png}}")


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
    return {"exploitability": evaluation.exploitability, "value": evaluation.value}
