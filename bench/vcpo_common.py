"""Shared pieces of the VCPO benches: the tiny recipe's config, its methods, and the
learner/runner pair that the controlled-staleness benches drive directly."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# The learner settings of the methods the paper compares (see VCPOConfig.training).
METHODS = {
    "sync GRPO": dict(correction="none", baseline="grpo", ess_lr_rule="none"),
    "GRPO, no correction": dict(correction="none", baseline="grpo", ess_lr_rule="none"),
    "seq-TIS only": dict(correction="seq_tis", baseline="grpo", ess_lr_rule="none"),
    "VCPO": dict(correction="seq_tis", baseline="opob", ess_lr_rule="sqrt",
                 opob_grad_norms="ghost"),
}


def tiny_config(**overrides):
    """VCPOConfig of tuned_examples/vcpo_math_tiny.yaml, with ``overrides`` on top."""
    from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig

    spec = yaml.safe_load((REPO / "tuned_examples/vcpo_math_tiny.yaml").read_text())
    settings = dict(spec["vcpo-math-tiny"]["config"])
    settings.update(overrides)
    settings["env"] = "MathEnv"
    return VCPOConfig().update_from_dict(settings)


def start_demo(updates_per_iteration: int):
    """Ray and the demo's algorithm (tuned_examples/vcpo_math_tiny.yaml, held-out evaluation
    off), its learner in this process with 1 torch thread. Ray starts its worker processes at
    nice 15 (RAY_worker_niceness) and the driver at 0: on a loaded machine the env runner then
    gets a sliver of a core while this process gets its full share, so here they start at this
    process's niceness and all compete alike."""
    import ray
    import torch

    from rllib_ext import registry

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_worker_niceness": "0"}})
    registry.register_project_envs()
    algo = tiny_config(accuracy_eval_interval=0,
                       updates_per_iteration=updates_per_iteration).build_algo()
    torch.set_num_threads(1)
    return algo


def env_runner_pid(algo) -> int:
    """Process id of the algorithm's (one) remote env runner."""
    [pid] = algo.env_runner_group.foreach_env_runner(lambda runner: os.getpid(),
                                                     local_env_runner=False)
    return pid


def local_runner(config):
    """A local LLMEnvRunner (its vLLM engine core in a child process)."""
    from rllib_ext import registry
    from rllib_ext.llm.env_runner import LLMEnvRunner

    registry.register_project_envs()
    config = config.copy(copy_frozen=False).env_runners(num_env_runners=0)
    return LLMEnvRunner(config=config, worker_index=0, num_workers=0)


def module_spaces(runner):
    """(observation, action) spaces of the runner's module, as a learner is built with."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    return runner.get_spaces()[DEFAULT_MODULE_ID]


def local_learner(config, spaces):
    """A freshly built (initial weights) local learner for ``config`` (``spaces``: see
    :func:`module_spaces`)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    return config.build_learner(spaces={DEFAULT_MODULE_ID: spaces})


def rewind(runner) -> None:
    """Back to the first prompt of the data order, so every run sees the same prompts."""
    from rllib_ext.llm.env_runner import ENV_STATE, NEXT_GROUP

    runner.set_state({ENV_STATE: {"epoch": 0, "position": 0}, NEXT_GROUP: 0})


def learner_weights(learner) -> dict:
    """The learner's weights and version as the Algorithm ships them to env runners."""
    from ray.rllib.core import COMPONENT_RL_MODULE
    from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

    state = learner.get_state(components=COMPONENT_RL_MODULE, inference_only=True)
    return {COMPONENT_RL_MODULE: state[COMPONENT_RL_MODULE],
            WEIGHTS_SEQ_NO: state[WEIGHTS_SEQ_NO]}
