"""An RLlib EnvRunner that generates with an LLM engine (vLLM by default).

Per ``sample()``: take ``prompts_per_sample`` prompts from the env, generate
``num_generations`` responses per prompt (one group), keep the per-token behaviour log-probs and
the policy version (``WEIGHTS_SEQ_NO``) of the weights that produced them, score the responses
through the env, and return one finished ``SingleAgentEpisode`` per response:

    observation  padded prompt ids           action   padded response ids
    reward       1.0 / 0.0 (answer checked)  extra_model_outputs:
        behaviour_logp  [R] per-token log-probs     response_length, prompt_length
        action_logp     their sum (sequence)        group_id, weights_seq_no (policy version)
        truncated       1 if the response hit max_response_tokens

Weights arrive through RLlib's normal path (``EnvRunnerGroup.sync_weights`` ->
:meth:`set_state`) and are loaded into the live engine in place, no restart; a state with an
older version than the engine's is ignored (version 0 forces the load, as RLlib's runners do).
With remote runners, the local runner (index 0) starts no engine: it only answers spaces.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Collection
from typing import Any

import numpy as np
import torch
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env import INPUT_ENV_SPACES
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import (
    EPISODE_RETURN_MEAN,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_EPISODES,
    NUM_EPISODES_LIFETIME,
    WEIGHTS_SEQ_NO,
)

from rllib_ext.llm import gpu_weight_routes
from rllib_ext.llm.causal_lm_module import token_spaces
from rllib_ext.llm.generation import make_backend
from rllib_ext.llm.tiny import resolve_model
from rllib_ext.llm.weight_sync import WeightSyncError, bucket_bytes_from_mb, load_state_dict

BEHAVIOUR_LOGP = "behaviour_logp"
RESPONSE_LENGTH = "response_length"
PROMPT_LENGTH = "prompt_length"
GROUP_ID = "group_id"
TRUNCATED_RESPONSE = "truncated_response"
ENV_STATE = "env_state"
NEXT_GROUP = "next_group"
# In a state for set_state: load the weights whatever their version and adopt it (a restored
# run's learner may be behind the runner's engine).
FORCE_WEIGHTS = "force_weights"
# Group ids are unique across runners: worker_index * GROUP_ID_STRIDE + a per-runner counter.
GROUP_ID_STRIDE = 10**12


class LLMEnvRunner(EnvRunner, Checkpointable):
    """EnvRunner owning one generation engine and one math env (its shard of the prompts)."""

    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        from transformers import AutoTokenizer

        self.model_path = resolve_model(self.config.llm_model)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.eos_id = tokenizer.eos_token_id
        observation_space, action_space = token_spaces(
            len(tokenizer), self.config.max_prompt_tokens, self.config.max_response_tokens)
        self._spaces = {INPUT_ENV_SPACES: (observation_space, action_space),
                        DEFAULT_MODULE_ID: (observation_space, action_space)}
        self._weights_seq_no = 0
        self._next_group = 0
        self.backend = None
        self.env = None
        self.engine_startup_s = 0.0
        if not (self.worker_index == 0 and self.num_workers > 0):
            self.make_env()
            self.backend = make_backend(
                self.config.generation_backend, self.model_path,
                seed=int(self.config.seed or 0) + (self.worker_index or 0),
                max_model_len=self.config.max_prompt_tokens + self.config.max_response_tokens,
                engine_kwargs={**gpu_weight_routes.engine_kwargs(self.config),
                               **self.config.engine_kwargs},
                engine_in_process=self.config.engine_in_process)
            self.engine_startup_s = getattr(self.backend, "startup_seconds", 0.0)

    # ------------------------------------------------------------------ set-up

    def make_env(self, split: str | None = None, shuffle: bool | None = None):
        """Create the env from ``config.env``/``env_config`` (or an extra one for ``split``)."""
        from ray.rllib.env.env_context import EnvContext
        from ray.tune.registry import ENV_CREATOR, _global_registry

        env_config = dict(self.config.env_config or {})
        env_config.setdefault("tokenizer", self.model_path)
        env_config.setdefault("max_prompt_tokens", self.config.max_prompt_tokens)
        env_config.setdefault("max_response_tokens", self.config.max_response_tokens)
        if split is not None:
            env_config["split"] = split
        if shuffle is not None:
            env_config["shuffle"] = shuffle
        # The eval env sees the whole split (no sharding).
        context = EnvContext(env_config, worker_index=self.worker_index or 0,
                             num_workers=self.num_workers if split is None else 0)
        env_spec = self.config.env
        if isinstance(env_spec, str):
            if _global_registry.contains(ENV_CREATOR, env_spec):
                env = _global_registry.get(ENV_CREATOR, env_spec)(context)
            else:
                from rllib_ext.registry import PROJECT_ENVS, import_object

                env = import_object(PROJECT_ENVS.get(env_spec, env_spec))(context)
        else:
            env = env_spec(context)
        if split is None:
            self.env = env
        return env

    def assert_healthy(self):
        assert self.env is not None and self.backend is not None or (
            self.worker_index == 0 and self.num_workers > 0), "LLMEnvRunner has no engine"

    def get_spaces(self):
        return self._spaces

    @contextlib.contextmanager
    def _exit_if_engine_dies(self):
        """A dead engine never answers again: exit, so that RLlib restarts this runner."""
        try:
            yield
        except Exception as error:
            if is_engine_dead(error):
                exit_for_restart(f"LLMEnvRunner {self.worker_index}: its vLLM engine died "
                                 f"({error!r}); exiting so that RLlib restarts this runner.")
            raise

    # ------------------------------------------------------------------ sampling

    def sample(self, *, num_timesteps=None, num_episodes=None, explore=True,
               random_actions=False, force_reset=False) -> list[SingleAgentEpisode]:
        """Generate ``num_generations`` responses for each of ``prompts_per_sample`` prompts
        (or enough prompts for ``num_episodes`` responses) and return the finished episodes."""
        if self.env is None or self.backend is None:
            raise RuntimeError(
                f"LLMEnvRunner {self.worker_index} has no engine (the local runner of an "
                "algorithm with remote env runners only answers spaces). Fix: sample from the "
                "remote runners, or set num_env_runners=0.")
        sample_started = time.perf_counter()
        sampling = self.config.sampling_settings()
        wanted = num_episodes or num_timesteps
        num_prompts = self.config.prompts_per_sample if not wanted \
            else max(1, math.ceil(wanted / sampling.n))
        resets = [self.env.reset() for _ in range(num_prompts)]
        prompts = [obs[:info[PROMPT_LENGTH]].tolist() for obs, info in resets]
        version = self._weights_seq_no

        started = time.perf_counter()
        with self._exit_if_engine_dies():
            groups = self.backend.generate(prompts, sampling)
        generation_s = time.perf_counter() - started

        completions = [c for group in groups for c in group]
        texts = [self.env.decode_response(c.token_ids) for c in completions]
        golds = [info["answer"] for _, info in resets for _ in range(sampling.n)]
        grades = self.env.grade_many(texts, golds)

        episodes = []
        for prompt_index, (obs, info) in enumerate(resets):
            group_id = (self.worker_index or 0) * GROUP_ID_STRIDE + self._next_group
            self._next_group += 1
            for j in range(sampling.n):
                k = prompt_index * sampling.n + j
                episodes.append(self._episode(obs, info, completions[k], grades[k], texts[k],
                                              group_id, version))
        self._log_sample_metrics(episodes, completions, grades, texts, generation_s)
        # The rest of sample() (prompts, grading, episodes) is what generation leaves.
        self.metrics.log_value("sample_time_s", time.perf_counter() - sample_started,
                               reduce="sum")
        return episodes

    def _episode(self, obs, info, completion, grade, text, group_id, version):
        from envs.math.env import grade_info

        width = self.config.max_response_tokens
        action = np.full(width, self.eos_id, dtype=np.int64)
        behaviour_logp = np.zeros(width, dtype=np.float32)
        length = min(len(completion.token_ids), width)
        action[:length] = completion.token_ids[:length]
        behaviour_logp[:length] = completion.logprobs[:length]
        episode = SingleAgentEpisode(observation_space=self._spaces[DEFAULT_MODULE_ID][0],
                                     action_space=self._spaces[DEFAULT_MODULE_ID][1])
        episode.add_env_reset(observation=obs, infos=info)
        episode.add_env_step(
            observation=obs, action=action, reward=grade.reward, terminated=True,
            infos={**info, **grade_info(grade, text), "finish_reason": completion.finish_reason},
            extra_model_outputs={
                BEHAVIOUR_LOGP: behaviour_logp,
                Columns.ACTION_LOGP: np.float32(behaviour_logp[:length].sum()),
                RESPONSE_LENGTH: np.int64(length),
                PROMPT_LENGTH: np.int64(info[PROMPT_LENGTH]),
                GROUP_ID: np.int64(group_id),
                WEIGHTS_SEQ_NO: np.int64(version),
                TRUNCATED_RESPONSE: np.int64(completion.finish_reason == "length"),
            })
        return episode.to_numpy()

    def _log_sample_metrics(self, episodes, completions, grades, texts, generation_s):
        m = self.metrics
        count = len(episodes)
        generated = sum(len(c.token_ids) for c in completions)
        m.log_value(NUM_ENV_STEPS_SAMPLED, count, reduce="sum")
        m.log_value(NUM_EPISODES, count, reduce="sum")
        m.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, count, reduce="lifetime_sum")
        m.log_value(NUM_EPISODES_LIFETIME, count, reduce="lifetime_sum")
        m.log_value("num_generated_tokens_lifetime", generated, reduce="lifetime_sum")
        m.log_value(EPISODE_RETURN_MEAN, float(np.mean([g.reward for g in grades])), reduce="mean")
        m.log_value("accuracy", float(np.mean([g.correct for g in grades])), reduce="mean")
        m.log_value("response_length_mean", generated / max(1, count), reduce="mean")
        m.log_value("tokens_per_s", generated / max(generation_s, 1e-9), reduce="mean")
        m.log_value("generation_time_s", generation_s, reduce="sum")
        m.log_value("truncated_response_fraction",
                    float(np.mean([c.finish_reason == "length" for c in completions])),
                    reduce="mean")
        m.log_value("num_empty_responses", sum(not t.strip() for t in texts), reduce="sum")
        m.log_value("num_non_utf8_responses", sum("\ufffd" in t for t in texts), reduce="sum")
        m.log_value("num_no_answer", sum(g.extracted is None for g in grades), reduce="sum")
        m.log_value("num_checker_timeouts",
                    sum(g.failure == "timeout" for g in grades), reduce="lifetime_sum")
        m.log_value("num_checker_errors",
                    sum(g.failure == "error" for g in grades), reduce="lifetime_sum")
        m.log_value(WEIGHTS_SEQ_NO, self._weights_seq_no, reduce="max")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str | None = None, num_problems: int | None = None,
                 temperature: float | None = None) -> dict:
        """Accuracy on a held-out split (greedy by default), with this runner's engine."""
        from rllib_ext.llm.evaluation import evaluate_accuracy

        if self.backend is None:
            raise RuntimeError("evaluate() needs a runner with an engine.")
        if not hasattr(self, "_eval_env"):
            self._eval_env = self.make_env(split=split or self.config.eval_split, shuffle=False)
        with self._exit_if_engine_dies():
            return evaluate_accuracy(
                self.backend, self._eval_env,
                num_problems=num_problems if num_problems is not None
                else self.config.eval_num_problems,
                temperature=self.config.eval_temperature if temperature is None else temperature,
                top_p=self.config.eval_top_p,
                max_tokens=self.config.max_response_tokens)

    # ------------------------------------------------------------------ weights and state

    def set_state(self, state: dict) -> None:
        """Load new weights into the engine (in place) when their version is newer."""
        if COMPONENT_RL_MODULE in state:
            version = int(state.get(WEIGHTS_SEQ_NO, 0))
            force = bool(state.get(FORCE_WEIGHTS))
            if force:
                self._weights_seq_no = version
            if (force or version == 0 or version > self._weights_seq_no) \
                    and self.backend is not None:
                module_state = state[COMPONENT_RL_MODULE]
                if hasattr(module_state, "hex") and not isinstance(module_state, dict):
                    import ray  # an ObjectRef

                    module_state = ray.get(module_state)
                if isinstance(module_state, dict) and DEFAULT_MODULE_ID in module_state:
                    module_state = module_state[DEFAULT_MODULE_ID]
                self._load_weights(module_state, version)
            if version > 0:
                self._weights_seq_no = version
        if ENV_STATE in state and self.env is not None:
            self.env.set_state(state[ENV_STATE])
        if NEXT_GROUP in state:
            self._next_group = int(state[NEXT_GROUP])
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]

    def _load_weights(self, module_state, version: int) -> None:
        """Load a weight update (a :class:`WeightManifest` of buckets in Ray's object store,
        or weights a GPU route moved already: anything with ``load_into(backend)``) or a module
        state (numpy arrays, e.g. from a checkpoint) into the engine. A sync that does not
        arrive whole leaves the engine with a partial update: the runner exits for a restart,
        as on a dead engine."""
        started = time.perf_counter()
        with self._exit_if_engine_dies():
            try:
                if hasattr(module_state, "load_into"):
                    report = module_state.load_into(self.backend)
                else:
                    report = load_state_dict(
                        self.backend, hf_state_dict_from_module_state(module_state),
                        version=version,
                        bucket_bytes=bucket_bytes_from_mb(self.config.weight_sync_bucket_mb))
            except WeightSyncError as error:
                exit_for_restart(f"LLMEnvRunner {self.worker_index}: WeightSyncError: {error} "
                                 "The engine holds a partial update; exiting so that RLlib "
                                 "restarts this runner.")
        self.metrics.log_value("weight_sync_time_s", time.perf_counter() - started,
                               reduce="mean")
        self.metrics.log_value("weight_sync_buckets", report["buckets_received"],
                               reduce="mean")
        self.metrics.log_value("num_weight_syncs", 1, reduce="lifetime_sum")

    def weight_dtype(self) -> str:
        """The engine's weight dtype (what a weight sync sends), e.g. "bfloat16"."""
        return str(self.backend.dtype).removeprefix("torch.")

    def get_state(self, components: str | Collection[str] | None = None, *,
                  not_components: str | Collection[str] | None = None, **kwargs) -> dict:
        state: dict[str, Any] = {WEIGHTS_SEQ_NO: self._weights_seq_no,
                                 NEXT_GROUP: self._next_group}
        if self.env is not None:
            state[ENV_STATE] = self.env.get_state()
        return state

    def get_metrics(self):
        return self.metrics.reduce()

    def get_ctor_args_and_kwargs(self):
        return (), {"config": self.config}

    def stop(self):
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.env is not None:
            self.env.close()
            self.env = None


def is_engine_dead(error: BaseException) -> bool:
    """Whether ``error`` means the engine can never answer again (vLLM's EngineDeadError)."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:
        return False
    return isinstance(error, EngineDeadError)


def exit_for_restart(message: str) -> None:
    """Kill this actor's process: Ray marks the actor dead and RLlib's fault tolerance
    (restart_failed_env_runners) starts a fresh one, with a fresh engine."""
    import logging
    import os

    logging.getLogger(__name__).error(message)
    print(message, flush=True)
    os._exit(1)


def hf_state_dict_from_module_state(module_state: dict) -> dict[str, torch.Tensor]:
    """RLModule state (``model.``-prefixed names, numpy or torch values) -> the Hugging Face
    model's state dict."""
    prefix = "model."
    return {name[len(prefix):] if name.startswith(prefix) else name: torch.as_tensor(np.asarray(value))
            for name, value in module_state.items()}
