"""Experiment files: load, override, validate, and turn into Tune search spaces.

The file format is RLlib's classic tuned-example YAML::

    cartpole-ppo:                 # experiment name
      run: PPO                    # or `algo:`; an RLlib or rllib-ext algorithm name
      env: CartPole-v1            # registered name or module:Class
      stop: {training_iteration: 10}
      config:                     # AlgorithmConfig keys (as in `AlgorithmConfig.to_dict()`)
        lr: {grid_search: [1.0e-3, 1.0e-4]}   # a sweep: one trial per value

Every problem is raised as a :class:`CLIError` naming the file, the key, and the fix.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from rllib_ext import registry
from rllib_ext.cli import env_kinds, preflight
from rllib_ext.cli.errors import CLIError

# Keys allowed at the top of one experiment.
EXPERIMENT_KEYS = (
    "run", "algo", "env", "stop", "config", "num_samples", "checkpoint_freq",
    "checkpoint_at_end", "storage_path",
)

# Tune search-space markers: {marker: [...]} anywhere in `config` becomes a Tune domain.
SEARCH_SPACE_MARKERS = ("grid_search", "choice", "uniform", "loguniform", "randint")

# AlgorithmConfig properties that have no setter, and the attribute `update_from_dict` can set.
_READ_ONLY_ALIASES = {"model_config": "_model_config", "learner_class": "_learner_class"}

# Keys `AlgorithmConfig.update_from_dict` handles itself although they are not attributes.
_SPECIAL_CONFIG_KEYS = ("multiagent", "callbacks", "env", "env_config")


@dataclass
class Experiment:
    """One experiment ready for Tune: the trainable class plus its (search) space."""

    name: str
    algo_name: str
    algo_class: type
    param_space: dict
    stop: dict = field(default_factory=dict)
    num_samples: int = 1
    checkpoint_freq: int = 0
    checkpoint_at_end: bool = True
    storage_path: str | None = None
    source: str = "command line"
    notes: list[str] = field(default_factory=list)  # what the checks decided for the user


# ----------------------------------------------------------------------------- loading


def load_yaml_file(path: str) -> dict:
    """Read a YAML experiment file into a dict of experiments."""
    if not os.path.exists(path):
        raise CLIError("file not found.", source=path,
                       fix="check the path (see tuned_examples/ for ready-made files).")
    if os.path.isdir(path):
        raise CLIError("is a directory, not a YAML file.", source=path,
                       fix="pass the path of a .yaml file.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CLIError(f"YAML syntax error at {where}{problem}.", source=path,
                       fix="correct the YAML at that position (indentation, ':' after keys, "
                           "quotes around strings with special characters).") from None
    if not isinstance(doc, dict) or not doc:
        raise CLIError("does not hold a mapping of experiments.", source=path,
                       fix="write `<experiment-name>: {run: ALGO, env: ENV, config: {...}}`.")
    return doc


def parse_json_option(text: str | None, flag: str) -> dict:
    """Parse a `--config`/`--stop` JSON object given on the command line."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}).",
                       source="command line",
                       fix=f"""quote it as one shell word, e.g. {flag} '{{"lr": 0.0001}}'.""") \
            from None
    if not isinstance(value, dict):
        raise CLIError(f"{flag} must be a JSON object, got {type(value).__name__}.",
                       source="command line", fix=f"""write e.g. {flag} '{{"key": value}}'.""")
    return value


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` with ``override`` merged in; nested dicts merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) \
                and not _is_search_space(value):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ----------------------------------------------------------------------------- search spaces


def _is_search_space(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SEARCH_SPACE_MARKERS


def _candidates(value: Any) -> list:
    """The concrete values a (possibly search-space) value can take, for validation."""
    if not _is_search_space(value):
        return [value]
    marker, arg = next(iter(value.items()))
    if marker in ("grid_search", "choice"):
        return list(arg)
    return [arg[0], arg[1]]


def to_tune_search_space(value: Any, source: str, key: str) -> Any:
    """Replace ``{grid_search: [...]}``, ``{choice: [...]}``, ``{uniform|loguniform|randint:
    [low, high]}`` markers (at any depth) with Ray Tune domains."""
    from ray import tune

    if isinstance(value, dict):
        if _is_search_space(value):
            marker, arg = next(iter(value.items()))
            _check_search_space_arg(marker, arg, source, key)
            if marker == "grid_search":
                return tune.grid_search(list(arg))
            if marker == "choice":
                return tune.choice(list(arg))
            return getattr(tune, marker)(arg[0], arg[1])
        return {k: to_tune_search_space(v, source, f"{key}.{k}") for k, v in value.items()}
    return value


def _check_search_space_arg(marker: str, arg: Any, source: str, key: str) -> None:
    if marker in ("grid_search", "choice"):
        if not isinstance(arg, list) or not arg:
            raise CLIError(f"`{marker}` needs a non-empty list of values.", source=source,
                           key=key, fix=f"write `{{{marker}: [value1, value2]}}`.")
        return
    ok = isinstance(arg, list) and len(arg) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in arg) and arg[0] < arg[1]
    if ok and marker == "loguniform":
        ok = arg[0] > 0
    if not ok:
        raise CLIError(f"`{marker}` needs [low, high] numbers with low < high"
                       + (" and low > 0" if marker == "loguniform" else "") + f", got {arg!r}.",
                       source=source, key=key, fix=f"write e.g. `{{{marker}: [0.0001, 0.01]}}`.")


def first_variant(value: Any) -> Any:
    """One concrete point of a search space (the first grid/choice value, the low bound)."""
    if isinstance(value, dict):
        if _is_search_space(value):
            return first_variant(_candidates(value)[0])
        return {k: first_variant(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- validation


def resolve_algorithm(name: Any, source: str, key: str) -> type:
    if not isinstance(name, str) or not name:
        raise CLIError("the algorithm name is missing or not a string.", source=source, key=key,
                       fix="set `run: PPO` (or VCPO, TMFPG, ...) in the experiment.")
    try:
        return registry.get_algorithm_class(name)
    except KeyError:
        known = registry.known_algorithm_names()
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.5)
        hint = f"Did you mean '{close[0]}'? " if close else ""
        raise CLIError(f"unknown algorithm '{name}'. {hint}Known algorithms: {', '.join(known)}.",
                       source=source, key=key,
                       fix="use one of the known names or a 'package.module:AlgorithmClass' path."
                       ) from None
    except (ImportError, AttributeError) as e:
        raise CLIError(f"cannot import algorithm '{name}': {e}.", source=source, key=key,
                       fix="check the 'package.module:AlgorithmClass' path.") from None


def resolve_environment(value: Any, source: str, key: str) -> Any:
    if _is_search_space(value):
        _check_search_space_arg(*next(iter(value.items())), source, key)
    candidates = _candidates(value)
    resolved = []
    for env in candidates:
        try:
            resolved.append(registry.resolve_env(env))
        except KeyError:
            close = difflib.get_close_matches(str(env), registry.known_env_names(), n=3,
                                              cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            project = ", ".join(sorted(registry.PROJECT_ENVS)) or "none yet"
            raise CLIError(f"unknown environment '{env}'.{hint}",
                           source=source, key=key,
                           fix="use a gymnasium-registered id (e.g. CartPole-v1), an rllib-ext "
                               f"env ({project}), or a 'package.module:EnvClass' path.") \
                from None
    if _is_search_space(value):
        marker = next(iter(value))
        return {marker: resolved}
    return resolved[0]


def _known_config_keys(default_config) -> set[str]:
    keys = {k for k in vars(default_config) if not k.startswith("__")}
    keys |= {name for name, attr in inspect.getmembers(type(default_config))
             if isinstance(attr, property) and attr.fset is not None}
    keys |= set(_READ_ONLY_ALIASES) | set(_SPECIAL_CONFIG_KEYS)
    return keys


def _type_error(value: Any, default: Any) -> str | None:
    """Why ``value`` cannot replace a config field whose default is ``default`` (None if ok)."""
    if default is None or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a boolean (true/false)"
    if isinstance(default, (int, float)):
        # Numbers, or schedules like [[timestep, value], ...].
        if isinstance(value, (int, float, list)) and not isinstance(value, bool):
            return None
        return "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a mapping"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "a list"
    return None


def _coerce_numeric_string(value: Any, default: Any) -> Any:
    """YAML reads `1e-4` (no dot) as a string; users mean the number."""
    if isinstance(value, str) and isinstance(default, (int, float)) \
            and not isinstance(default, bool):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number):
            return int(number) if isinstance(default, int) and number.is_integer() else number
    return value


def validate_config(config: dict, algo_name: str, algo_class: type, source: str,
                    prefix: str) -> dict:
    """Check keys and value types of ``config`` against the algorithm's default config.

    Returns the config with YAML-number strings coerced and read-only aliases translated.
    """
    default = algo_class.get_default_config()
    known = _known_config_keys(default)
    checked = {}
    for key, value in config.items():
        full_key = f"{prefix}.{key}"
        translated = default._translate_special_keys(key, warn_deprecated=False)
        if translated not in known and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CLIError(f"unknown config key '{key}' for {algo_name}.{hint}",
                           source=source, key=full_key,
                           fix=f"rename or remove it; valid keys are the fields of "
                               f"{type(default).__name__} (see `{type(default).__name__}"
                               f"().to_dict()`).")
        default_value = getattr(default, translated, None) if translated in vars(default) \
            else None
        if _is_search_space(value):
            marker, arg = next(iter(value.items()))
            if marker in ("grid_search", "choice") and isinstance(arg, list):
                arg = [_coerce_numeric_string(a, default_value) for a in arg]
            _check_search_space_arg(marker, arg, source, full_key)
            value = {marker: arg}
        else:
            value = _coerce_numeric_string(value, default_value)
        for candidate in _candidates(value):
            expected = _type_error(candidate, default_value)
            if expected:
                raise CLIError(f"expected {expected} for '{key}', got {type(candidate).__name__} "
                               f"{candidate!r}.", source=source, key=full_key,
                               fix=f"give '{key}' {expected} (its default is "
                                   f"{default_value!r}).")
        checked[_READ_ONLY_ALIASES.get(key, key)] = value
    return checked


def check_buildable(algo_class: type, config: dict, source: str, prefix: str):
    """Build and validate one concrete config point, turning RLlib's errors into CLIErrors;
    returns the AlgorithmConfig."""
    variant = first_variant(config)
    rllib_logger = logging.getLogger("ray.rllib")
    level = rllib_logger.level
    # The trial itself logs RLlib's warnings; a dry validation here would only repeat them.
    rllib_logger.setLevel(logging.ERROR)
    try:
        algo_config = algo_class.get_default_config().update_from_dict(variant)
        algo_config.validate()
    except Exception as e:  # RLlib raises ValueError, TypeError, AssertionError, ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fix = None if "Fix:" in message else "correct the config value(s) named in the message."
        raise CLIError(f"the config is rejected by {algo_class.__name__}: {message}",
                       source=source, key=prefix, fix=fix) from None
    finally:
        rllib_logger.setLevel(level)
    return algo_config


def build_experiment(name: str, spec: Any, source: str, *, config_override: dict | None = None,
                     stop_override: dict | None = None) -> Experiment:
    """Validate one experiment entry (a YAML block or the `--algo/--env` flags)."""
    if not isinstance(spec, dict):
        raise CLIError(f"experiment '{name}' must be a mapping, got {type(spec).__name__}.",
                       source=source, key=name,
                       fix="write `name: {run: ALGO, env: ENV, config: {...}}`.")
    for key in spec:
        if key not in EXPERIMENT_KEYS:
            close = difflib.get_close_matches(str(key), EXPERIMENT_KEYS, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CLIError(f"unknown experiment key '{key}'.{hint}", source=source,
                           key=f"{name}.{key}",
                           fix=f"use only {', '.join(EXPERIMENT_KEYS)}; algorithm settings go "
                               "under `config:`.")
    algo_key = "run" if "run" in spec else "algo"
    algo_name = spec.get(algo_key)
    algo_class = resolve_algorithm(algo_name, source, f"{name}.{algo_key}")

    config = spec.get("config") or {}
    if not isinstance(config, dict):
        raise CLIError(f"`config` must be a mapping, got {type(config).__name__}.",
                       source=source, key=f"{name}.config", fix="write `config: {lr: 0.001}`.")
    config = deep_merge(config, config_override or {})
    env = config.pop("env", None)
    env = spec.get("env", env) if env is None else env
    if env is None:
        raise CLIError("no environment given.", source=source, key=f"{name}.env",
                       fix="add `env: ENV_NAME` to the experiment (or --env on the command "
                           "line).")
    env = resolve_environment(env, source, f"{name}.env")
    config = validate_config(config, algo_class.__name__, algo_class, source, f"{name}.config")
    config["env"] = env
    algo_config = check_buildable(algo_class, config, source, f"{name}.config")
    for candidate in _candidates(env):
        preflight.check_env_for_algorithm(str(algo_name), algo_class, candidate, source,
                                          f"{name}.env")
    notes = []
    if env_kinds.algorithm_env_kind(str(algo_name), algo_class) == "llm_task":
        notes.append(preflight.check_model_source(algo_config.llm_model, source,
                                                  f"{name}.config.llm_model"))
        notes += preflight.check_llm_task(first_variant(env), algo_config, source,
                                          f"{name}.config")

    stop = deep_merge(spec.get("stop") or {}, stop_override or {})
    if not isinstance(stop, dict):
        raise CLIError("`stop` must be a mapping of metric -> value.", source=source,
                       key=f"{name}.stop", fix="write `stop: {training_iteration: 10}`.")
    for key, value in stop.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CLIError(f"stop criterion '{key}' must be a number, got {value!r}.",
                           source=source, key=f"{name}.stop.{key}",
                           fix="write e.g. `training_iteration: 10`.")
    preflight.check_stop_metrics(stop, str(algo_name), algo_class, algo_config, source,
                                 f"{name}.stop")

    num_samples = spec.get("num_samples", 1)
    checkpoint_freq = spec.get("checkpoint_freq", 0)
    for key, value in (("num_samples", num_samples), ("checkpoint_freq", checkpoint_freq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CLIError(f"'{key}' must be a non-negative integer, got {value!r}.",
                           source=source, key=f"{name}.{key}", fix=f"write e.g. `{key}: 1`.")

    return Experiment(
        name=name,
        algo_name=str(algo_name),
        algo_class=algo_class,
        param_space=to_tune_search_space(config, source, f"{name}.config"),
        stop=stop,
        num_samples=num_samples,
        checkpoint_freq=checkpoint_freq,
        checkpoint_at_end=bool(spec.get("checkpoint_at_end", True)),
        storage_path=spec.get("storage_path"),
        source=source,
        notes=list(dict.fromkeys(note for note in notes if note)),
    )


def experiments_from_file(path: str, *, config_override: dict | None = None,
                          stop_override: dict | None = None,
                          only: str | None = None) -> list[Experiment]:
    doc = load_yaml_file(path)
    if only is not None:
        if only not in doc:
            raise CLIError(f"no experiment named '{only}'.", source=path,
                           fix=f"use one of: {', '.join(map(str, doc))}.")
        doc = {only: doc[only]}
    return [build_experiment(str(name), spec, path, config_override=config_override,
                             stop_override=stop_override) for name, spec in doc.items()]
