"""Names -> algorithm classes and environments, for the `rllib` CLI and Ray Tune.

Algorithms resolve from this project's table first, then from RLlib's own registry
(``ray.rllib.algorithms.registry.ALGORITHMS``), and finally as a ``module:Class`` path.
Environments resolve from this project's table, gymnasium's registry, Tune's env
registry, or a ``module:Class`` path.
"""

from __future__ import annotations

import importlib
from typing import Any

# Project algorithms: name -> "module:attribute" (imported lazily: importing them pulls torch).
PROJECT_ALGORITHMS: dict[str, str] = {
    "VCPO": "rllib_ext.algorithms.vcpo.vcpo:VCPO",
    "TMFPG": "rllib_ext.algorithms.tmf_pg.tmf_pg:TMFPG",
}

# Project environments: name -> "module:attribute" of a gymnasium.Env / MultiAgentEnv class.
PROJECT_ENVS: dict[str, str] = {
    "MathEnv": "envs.math.env:MathEnv",
    "ResourceSelection": "envs.mean_field.resource_selection:ResourceSelectionEnv",
    "DynamicQueueing": "envs.mean_field.queueing:DynamicQueueingEnv",
}


# What env_class returns for a name only Tune's registry knows (its class is not visible).
UNKNOWN_ENV_CLASS = object


def env_class(env: Any) -> type:
    """The class behind what ``resolve_env`` returned: a project env's class, a gymnasium id's
    class, the class itself, or UNKNOWN_ENV_CLASS for other Tune-registered names."""
    if isinstance(env, type):
        return env
    if isinstance(env, str) and env in PROJECT_ENVS:
        return import_object(PROJECT_ENVS[env])
    import gymnasium as gym

    if isinstance(env, str) and env in gym.registry:
        entry = gym.registry[env].entry_point
        return import_object(entry) if isinstance(entry, str) else gym.Env
    return UNKNOWN_ENV_CLASS


def import_object(path: str) -> Any:
    """Import ``"package.module:Attribute"`` and return the attribute.

    Raises ImportError/AttributeError with the path in the message.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ImportError(f"'{path}' is not of the form 'package.module:Name'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError as e:
        raise AttributeError(f"module '{module_name}' has no attribute '{attribute}'") from e


def rllib_algorithm_names() -> list[str]:
    from ray.rllib.algorithms.registry import ALGORITHMS

    return sorted(ALGORITHMS)


def known_algorithm_names() -> list[str]:
    """All algorithm names the CLI accepts: this project's, then RLlib's."""
    return sorted(PROJECT_ALGORITHMS) + [
        n for n in rllib_algorithm_names() if n not in PROJECT_ALGORITHMS
    ]


def get_algorithm_class(name: str) -> type:
    """Resolve an algorithm name (case-insensitive) or ``module:Class`` path to its class.

    Raises KeyError when the name is unknown.
    """
    by_upper = {n.upper(): n for n in known_algorithm_names()}
    canonical = by_upper.get(name.upper())
    if canonical in PROJECT_ALGORITHMS:
        return import_object(PROJECT_ALGORITHMS[canonical])
    if canonical is not None:
        from ray.rllib.algorithms.registry import ALGORITHMS

        return ALGORITHMS[canonical]()[0]
    if ":" in name:
        return import_object(name)
    raise KeyError(name)


def register_project_envs() -> None:
    """Register this project's envs with Tune so RLlib finds them by name in every worker."""
    from ray.tune.registry import register_env

    for name, path in PROJECT_ENVS.items():
        register_env(name, _EnvCreator(path))


def env_id_and_creator(env_specifier: Any, config) -> tuple:
    """RLlib's ``Algorithm._get_env_id_and_creator`` with this project's env names registered
    first. ``Algorithm.__init__`` resolves the env before ``setup`` runs, so an algorithm
    built from Python (not by the `rllib` command) finds "MathEnv" etc. only this way."""
    from ray.rllib.algorithms.algorithm import Algorithm

    register_project_envs()
    return Algorithm._get_env_id_and_creator(env_specifier, config)


class _EnvCreator:
    """Picklable env creator: imports the class inside the worker that builds the env."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, env_config):
        return import_object(self.path)(dict(env_config or {}))


def resolve_env(name: Any) -> Any:
    """Return what RLlib's ``config.environment(env=...)`` should get for a CLI/YAML value.

    Project env names and registered gymnasium/Tune names stay strings; a ``module:Class``
    path becomes the class itself. Raises KeyError when nothing matches.
    """
    if not isinstance(name, str):
        return name
    if name in PROJECT_ENVS:
        return name
    import gymnasium as gym

    if name in gym.registry:
        return name
    from ray.tune.registry import ENV_CREATOR, _global_registry

    if _global_registry.contains(ENV_CREATOR, name):
        return name
    if ":" in name:
        try:
            return import_object(name)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"{name} ({e})") from e
    raise KeyError(name)


def known_env_names() -> list[str]:
    import gymnasium as gym

    return sorted(PROJECT_ENVS) + sorted(gym.registry)
