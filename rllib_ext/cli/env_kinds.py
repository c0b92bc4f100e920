"""Which envs each algorithm trains on (for `rllib list` and the checks before a run).

VCPO (and any algorithm configured by an LLMRolloutConfig) takes LLM tasks, TMFPG mean-field
games, RLlib's algorithms gymnasium and RLlib multi-agent envs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rllib_ext import registry


@dataclass(frozen=True)
class EnvKind:
    """A family of envs an algorithm can train on."""

    description: str
    accepts: Callable[[type], bool]


def _is_llm_task(env_class: type) -> bool:
    """Has the methods of rllib_ext.llm.task.Task (a Protocol with a data member, which
    issubclass cannot check)."""
    return all(callable(getattr(env_class, name, None))
               for name in ("next_prompts", "decode", "score", "get_state", "set_state", "close"))


def _is_mean_field_env(env_class: type) -> bool:
    from envs.mean_field.env import MeanFieldEnv

    return issubclass(env_class, MeanFieldEnv)


def _is_rllib_env(env_class: type) -> bool:
    import gymnasium as gym
    from ray.rllib.env.multi_agent_env import MultiAgentEnv

    return issubclass(env_class, (gym.Env, MultiAgentEnv))


ENV_KINDS: dict[str, EnvKind] = {
    "llm_task": EnvKind("LLM tasks (classes following rllib_ext.llm.task.Task)", _is_llm_task),
    "mean_field": EnvKind("mean-field games (envs.mean_field.env.MeanFieldEnv)",
                          _is_mean_field_env),
    "rllib": EnvKind("gymnasium envs and RLlib multi-agent envs", _is_rllib_env),
}
# Project algorithms that need a particular kind of env (the others: "rllib").
PROJECT_ALGORITHM_ENV_KINDS = {"VCPO": "llm_task", "TMFPG": "mean_field"}


def algorithm_env_kind(name: str, algo_class: type) -> str:
    """The kind of env an algorithm takes: its table entry, "llm_task" for any algorithm
    configured by an LLMRolloutConfig, else "rllib"."""
    canonical = {n.upper(): n for n in registry.PROJECT_ALGORITHMS}.get(str(name).upper())
    if canonical in PROJECT_ALGORITHM_ENV_KINDS:
        return PROJECT_ALGORITHM_ENV_KINDS[canonical]
    from rllib_ext.llm.rollout_config import LLMRolloutConfig

    if isinstance(algo_class.get_default_config(), LLMRolloutConfig):
        return "llm_task"
    return "rllib"


def envs_for(kind: str) -> str:
    """The envs of a kind, in words (for `rllib list` and error messages)."""
    names = [name for name in sorted(registry.PROJECT_ENVS)
             if ENV_KINDS[kind].accepts(registry.env_class(name))]
    extra = {"rllib": "any gymnasium id (e.g. CartPole-v1)"}.get(kind)
    return ", ".join([*names, *([extra] if extra else []), "a 'package.module:Class' path"])
