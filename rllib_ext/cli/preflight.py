"""Checks that run before anything starts (``--dry-run`` and the start of ``rllib train``).

What Ray, vLLM or a trial would otherwise find out a minute later, or never: an env the
algorithm cannot train on, a model path without a model, a hub id that does not exist, a
dataset that is missing or does not parse, an unknown env_config key, an evaluation split that
is the training data, a stop metric the algorithm never reports. Each problem is a
:class:`CLIError`; what the checks decide on the user's behalf comes back as notes.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from rllib_ext import registry
from rllib_ext.cli import env_kinds
from rllib_ext.cli.errors import CLIError

# Result keys Tune adds to every result, and RLlib's top-level and env-runner metrics.
TUNE_RESULT_KEYS = ("training_iteration", "time_total_s", "time_this_iter_s", "timestamp",
                    "iterations_since_restore", "time_since_restore", "done")
RLLIB_TOP_LEVEL_KEYS = ("num_env_steps_sampled_lifetime", "num_episodes_lifetime",
                        "num_training_step_calls_per_iteration", "num_agent_steps_sampled_lifetime")
RLLIB_RUNNER_KEYS = ("episode_return_mean", "episode_return_max", "episode_return_min",
                     "episode_len_mean", "episode_len_max", "episode_len_min",
                     "episode_duration_sec_mean", "num_env_steps_sampled",
                     "num_env_steps_sampled_lifetime", "num_episodes", "num_episodes_lifetime",
                     "num_agent_steps_sampled", "num_agent_steps_sampled_lifetime",
                     "num_module_steps_sampled", "num_module_steps_sampled_lifetime",
                     "agent_episode_returns_mean", "module_episode_returns_mean",
                     "env_to_module_sum_episodes_length_in", "sample")
# Groups whose members depend on modules, learners and connectors: any name below them.
OPEN_GROUPS = ("learners/", "timers/", "perf/", "fault_tolerance/", "env_runner_group/")


# ----------------------------------------------------------------------------- env

def check_env_for_algorithm(algo_name: str, algo_class: type, env: Any, source: str,
                            key: str) -> None:
    """Refuse an env the algorithm cannot train on (e.g. VCPO on CartPole)."""
    kind = env_kinds.algorithm_env_kind(algo_name, algo_class)
    env_class = registry.env_class(env)
    if env_class is registry.UNKNOWN_ENV_CLASS:  # a Tune-registered creator: cannot tell
        return
    if not env_kinds.ENV_KINDS[kind].accepts(env_class):
        label = env if isinstance(env, str) else getattr(env, "__name__", repr(env))
        raise CLIError(f"{algo_name} cannot train on '{label}': it takes "
                       f"{env_kinds.ENV_KINDS[kind].description}.", source=source, key=key,
                       fix=f"use one of {env_kinds.envs_for(kind)} (see `rllib list`).")


# ----------------------------------------------------------------------------- LLM inputs

def check_model_source(name: Any, source: str, key: str) -> str | None:
    """``name`` is "tiny", a local model directory, or a hub id that exists (or is cached).
    Returns a note for the user (e.g. that the model will be downloaded)."""
    if not isinstance(name, str) or not name:
        raise CLIError(f"the model must be 'tiny', a model directory or a Hugging Face hub id, "
                       f"got {name!r}.", source=source, key=key,
                       fix="set llm_model, e.g. llm_model: tiny.")
    if name == "tiny":
        return None
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or path.exists() or name.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise CLIError(f"model directory '{name}' does not exist (relative paths resolve "
                           f"against {os.getcwd()}).", source=source, key=key,
                           fix="fix the path, or give 'tiny' or a Hugging Face hub id.")
        missing = [f for f in ("config.json",) if not (path / f).is_file()]
        if missing or not any((path / f).is_file() for f in ("tokenizer.json",
                                                              "tokenizer_config.json")):
            raise CLIError(f"'{name}' is not a Hugging Face model directory (it needs "
                           "config.json, the weights and the tokenizer files).", source=source,
                           key=key, fix="point it at a folder written by save_pretrained or "
                           "`rllib export`.")
        return None
    return _check_hub_id(name, source, key)


def _check_hub_id(name: str, source: str, key: str) -> str | None:
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise CLIError(f"'{name}' is neither a local directory nor a valid Hugging Face hub id "
                       f"({e}).", source=source, key=key,
                       fix="give an existing model directory or a hub id like 'org/name'.") \
            from None
    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CLIError(f"hub model '{name}' is not in the local Hugging Face cache and "
                       "HF_HUB_OFFLINE is set.", source=source, key=key,
                       fix="download it first (`hf download NAME`), or unset HF_HUB_OFFLINE.")
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        huggingface_hub.model_info(name, timeout=10)
    except GatedRepoError:
        raise CLIError(f"hub model '{name}' is gated.", source=source, key=key,
                       fix="accept its terms on huggingface.co and log in "
                           "(`hf auth login`).") from None
    except RepositoryNotFoundError:
        raise CLIError(f"hub model '{name}' does not exist (or is private).", source=source,
                       key=key, fix="check the id on huggingface.co (log in with `hf auth "
                                    "login` for private models).") from None
    except Exception as e:  # no network: the run will try again
        return (f"model '{name}' could not be checked on the Hugging Face hub ({type(e).__name__})"
                "; it will be downloaded when the run starts")
    return f"model '{name}' will be downloaded from the Hugging Face hub when the run starts"


def check_llm_task(env: Any, config: Any, source: str, key: str) -> list[str]:
    """The task's env_config before a run: no keys the runner sets, and the task's own
    ``check_config`` (dataset files exist and parse, keys known, evaluation split held out)."""
    from rllib_ext import tiny_build
    from rllib_ext.llm.task import RUNNER_KEYS
    from rllib_ext.llm.tiny import resolve_model

    env_config = dict(config.env_config or {})
    for runner_key in RUNNER_KEYS:
        if runner_key in env_config:
            setting = {"tokenizer": "llm_model", "split": "eval_split (evaluation) or "
                       "nothing (training uses 'train')", "shuffle": "nothing (training "
                       "shuffles, evaluation keeps the order)"}.get(runner_key, runner_key)
            raise CLIError(f"env_config.{runner_key} is set by the env runner from the "
                           "algorithm's settings.", source=source,
                           key=f"{key}.env_config.{runner_key}",
                           fix=f"remove it; set {setting} in config instead.")
    env_class = registry.env_class(env)
    check = getattr(env_class, "check_config", None)
    if check is None:
        return []
    model = config.llm_model
    if model == "tiny" or Path(str(model)).expanduser().is_dir():
        tiny_build.ensure_built(model)
        env_config["tokenizer"] = resolve_model(model)
        env_config["max_prompt_tokens"] = config.max_prompt_tokens
    evaluates = getattr(config, "accuracy_eval_interval", 0)
    try:
        return list(check(env_config, eval_split=config.eval_split if evaluates else None))
    except ValueError as e:  # a ConfigError names the key, the problem and the fix
        config_key = getattr(e, "key", None)
        raise CLIError(getattr(e, "problem", str(e)).rstrip(".") + ".", source=source,
                       key=f"{key}.env_config" + (f".{config_key}" if config_key else ""),
                       fix=getattr(e, "fix", "correct env_config").rstrip(".") + ".") from None


# ----------------------------------------------------------------------------- stop metrics

def known_result_metrics(algo_class: type, config: Any) -> tuple[set[str], tuple[str, ...]]:
    """(exact metric paths, open group prefixes) an algorithm reports: Tune's and RLlib's
    standard results, LLM runner and evaluation metrics for LLM algorithms, and the groups of
    the algorithm's own progress metrics."""
    exact = set(TUNE_RESULT_KEYS) | set(RLLIB_TOP_LEVEL_KEYS)
    exact |= {f"env_runners/{k}" for k in RLLIB_RUNNER_KEYS}
    exact |= {f"evaluation/env_runners/{k}" for k in RLLIB_RUNNER_KEYS}
    groups = set(OPEN_GROUPS)
    from rllib_ext.llm.rollout_config import LLMRolloutConfig

    if isinstance(config, LLMRolloutConfig):
        from rllib_ext.llm.env_runner import ROLLOUT_METRICS, RUNNER_METRICS
        from rllib_ext.llm.evaluation import EVALUATION_METRICS

        exact |= {f"env_runners/{k}" for k in RUNNER_METRICS}
        rollout_group = getattr(algo_class, "rollout_metrics_group", "env_runners")
        exact |= {f"{rollout_group}/{k}" for k in ROLLOUT_METRICS}
        exact |= {f"evaluation/{k}" for k in EVALUATION_METRICS}
        groups |= {f"{rollout_group}/rewards/", "evaluation/rewards/"}
    for _, path, _ in getattr(algo_class, "progress_metrics", ()):
        exact.add(path)
        group = path.rsplit("/", 1)[0] + "/" if "/" in path else None
        if group and group not in ("env_runners/", "evaluation/"):
            groups.add(group)
    if _has_custom_callbacks(config):  # they may report metrics of their own
        groups |= {"env_runners/", "evaluation/"}
    return exact, tuple(sorted(groups))


def _has_custom_callbacks(config) -> bool:
    from ray.rllib.callbacks.callbacks import RLlibCallback

    callbacks = getattr(config, "callbacks_class", RLlibCallback)
    return callbacks not in (RLlibCallback, None) or any(
        getattr(config, name, None) for name in vars(config) if name.startswith("callbacks_on_"))


def check_stop_metrics(stop: dict, algo_name: str, algo_class: type, config: Any, source: str,
                       key: str) -> None:
    exact, groups = known_result_metrics(algo_class, config)
    for metric in stop:
        if metric in exact or str(metric).startswith(groups):
            continue
        close = difflib.get_close_matches(str(metric), sorted(exact), n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise CLIError(f"stop metric '{metric}' is not reported by {algo_name}.{hint}",
                       source=source, key=f"{key}.{metric}",
                       fix="use a metric of result.json (nested ones with '/'), e.g. "
                           "training_iteration, time_total_s or env_runners/"
                           "episode_return_mean.")
