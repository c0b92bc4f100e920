"""A TMF-PG run resumed from a checkpoint continues: iteration counter, optimizer state, agent
counters and the exploitability curve pick up where they were."""

import numpy as np
import pytest
from ray.rllib.core import COMPONENT_LEARNER

from envs.mean_field import ResourceSelectionEnv
from rllib_ext.algorithms.tmf_pg import TMFPGConfig


def optimizer_steps(algo) -> list[float]:
    optimizers = algo.learner_group.get_state()[COMPONENT_LEARNER]["optimizer"]
    return [float(s["step"]) for opt in optimizers.values()
            for s in opt["state"]["state"].values()]


def test_resume_continues_the_run(ray_session, tmp_path):
    config = TMFPGConfig().environment(
        ResourceSelectionEnv, env_config={"num_agents": 20, "activation": "k=5"}) \
        .training(num_episodes_per_iteration=2).debugging(seed=3)
    algo = config.build_algo()
    try:
        history = [algo.train() for _ in range(3)]
        checkpoint = algo.save(str(tmp_path)).checkpoint.path
        steps = optimizer_steps(algo)
        metrics = algo.exact_metrics()
        continued = algo.train()
    finally:
        algo.stop()
    actions_per_iteration = history[1]["num_agent_actions_lifetime"] - \
        history[0]["num_agent_actions_lifetime"]

    restored = type(algo).from_checkpoint(checkpoint)
    try:
        assert restored.iteration == 3
        assert optimizer_steps(restored) == steps and steps and steps[0] == 3
        assert restored.exact_metrics() == pytest.approx(metrics)
        result = restored.train()
        assert result["training_iteration"] == 4
        assert result["num_agent_actions_lifetime"] == \
            history[-1]["num_agent_actions_lifetime"] + actions_per_iteration
        assert optimizer_steps(restored)[0] == 4
        # The curve continues from the checkpoint, not from a fresh policy.
        fresh = history[0]["mean_field"]["exploitability"]
        assert abs(result["mean_field"]["exploitability"] -
                   continued["mean_field"]["exploitability"]) < \
            abs(fresh - continued["mean_field"]["exploitability"])
        assert np.isfinite(result["mean_field"]["exploitability"])
    finally:
        restored.stop()
