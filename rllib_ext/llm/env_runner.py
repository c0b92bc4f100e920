"""An RLlib EnvRunner that generates with an LLM engine (vLLM by default).

Per ``sample()``: take ``prompts_per_sample`` prompts from the task (:class:`~rllib_ext.llm.task.
Task`), generate ``num_generations`` responses per prompt (one group), keep the per-token
behaviour log-probs and the policy version (``WEIGHTS_SEQ_NO``) of the weights that produced
them, have the task score the responses, and return one finished ``SingleAgentEpisode`` per
response:

    observation  padded prompt ids           action   padded response ids
    reward       the task's reward           extra_model_outputs (llm/columns.py):
        behaviour_logp  [R] per-token log-probs     response_length, prompt_length
        action_logp     their sum (sequence)        group_id, weights_seq_no (policy version)
        truncated_response  1 if the response hit max_response_tokens

The task is built from ``config.env`` by RLlib's env creator (any class following the Task
protocol). Weights arrive through RLlib's normal path (``EnvRunnerGroup.sync_weights`` ->
:meth:`set_state`) and are loaded into the live engine in place, no restart; a state with an
older version than the engine's is ignored (version 0 forces the load, as RLlib's runners do).
With remote runners, the local runner (index 0) starts no engine: it only answers spaces.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
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
from rllib_ext.llm.columns import (
    ANSWER,
    BEHAVIOUR_LOGP,
    GROUP_ID,
    PROMPT,
    PROMPT_LENGTH,
    RESPONSE_LENGTH,
    TRUNCATED_RESPONSE,
    UID,
)
from rllib_ext.llm.episode_list import EpisodeList
from rllib_ext.llm.generation import make_backend
from rllib_ext.llm.task import Task
from rllib_ext.llm.tiny import resolve_model
from rllib_ext.llm.weight_sync import (
    FORCE_WEIGHTS,
    WeightSyncError,
    bucket_bytes_from_mb,
    load_state_dict,
)

ENV_STATE = "env_state"
NEXT_GROUP = "next_group"
# Env-runner metric: a markdown table of some completions of the latest sample.
COMPLETIONS_TABLE = "completions"
# What a user reads of the rollouts besides the mean return and the accuracy: the spread of the
# rewards, each reward function's mean (under rewards/<name>), lengths, a table of samples.
# An algorithm reports these under its own name (VCPO: vcpo/reward_std, ...).
ROLLOUT_METRICS = ("reward_std", "fraction_groups_one_reward", "rewards", "response_length_mean",
                   "response_length_min", "response_length_max", "truncated_response_fraction",
                   COMPLETIONS_TABLE)
# The other metrics an LLMEnvRunner reports, under env_runners/: RLlib's counters, the mean
# return and accuracy, the task's counts (num_<name>), generation and weight-sync timings.
RUNNER_METRICS = (
    NUM_ENV_STEPS_SAMPLED, NUM_ENV_STEPS_SAMPLED_LIFETIME, NUM_EPISODES, NUM_EPISODES_LIFETIME,
    "num_generated_tokens_lifetime", EPISODE_RETURN_MEAN, "accuracy", "num_no_answer",
    "num_checker_timeouts", "num_checker_errors", "tokens_per_s", "generation_time_s",
    "num_empty_responses", "num_non_utf8_responses", WEIGHTS_SEQ_NO, "weight_sync_time_s",
    "num_weight_syncs", "weight_sync_buckets", "sample_time_s")
# Group ids are unique across runners: worker_index * GROUP_ID_STRIDE + a per-runner counter.
GROUP_ID_STRIDE = 10**12


class LLMEnvRunner(EnvRunner, Checkpointable):
    """EnvRunner owning one generation engine and one task (its shard of the prompts)."""

    def __init__(self, *, config, env_creator=None, **kwargs):
        super().__init__(config=config, **kwargs)
        from transformers import AutoTokenizer

        self.model_path = resolve_model(self.config.llm_model)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else self.eos_id
        observation_space, action_space = token_spaces(
            len(tokenizer), self.config.max_prompt_tokens, self.config.max_response_tokens)
        self._spaces = {INPUT_ENV_SPACES: (observation_space, action_space),
                        DEFAULT_MODULE_ID: (observation_space, action_space)}
        # RLlib's creator for config.env (a runner built by hand resolves config.env as its
        # algorithm does: a registered name, a class or a "module.Class" path, and the
        # algorithm's own names, e.g. VCPO's project envs, also where none was registered).
        if env_creator is None:
            from ray.rllib.algorithms.algorithm import Algorithm

            algorithm = self.config.algo_class or Algorithm
            env_creator = algorithm._get_env_id_and_creator(self.config.env, self.config)[1]
        self._task_creator = env_creator
        self._weights_seq_no = 0
        self._next_group = 0
        self.backend = None
        self.env = None
        self._eval_task = None
        self.engine_startup_s = 0.0
        if not (self.worker_index == 0 and self.num_workers > 0):
            self.env = self.make_task()
            self.backend = make_backend(
                self.config.generation_backend, self.model_path,
                seed=int(self.config.seed or 0) + (self.worker_index or 0),
                max_model_len=self.config.max_prompt_tokens + self.config.max_response_tokens,
                engine_kwargs={**gpu_weight_routes.engine_kwargs(self.config),
                               **self.config.engine_kwargs},
                engine_in_process=self.config.engine_in_process)
            self.engine_startup_s = getattr(self.backend, "startup_seconds", 0.0)

    # ------------------------------------------------------------------ set-up

    def make_task(self, split: str = "train") -> Task:
        """Build the task from ``config.env``/``env_config``: this runner's shard of the
        training split, or (``split`` other than "train") a whole split in dataset order."""
        from ray.rllib.env.env_context import EnvContext

        training = split == "train"
        env_config = {**(self.config.env_config or {}), "tokenizer": self.model_path,
                      "max_prompt_tokens": self.config.max_prompt_tokens, "split": split,
                      "shuffle": training}
        context = EnvContext(env_config, worker_index=self.worker_index or 0,
                             num_workers=self.num_workers if training else 0)
        task = self._task_creator(context)
        if not isinstance(task, Task):
            raise TypeError(f"env {self.config.env!r} built a {type(task).__name__}, which is not "
                            "an LLM task. Fix: LLM algorithms take envs that follow "
                            "rllib_ext.llm.task.Task (e.g. MathEnv); see `rllib list`.")
        return task

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
        prompts = self.env.next_prompts(num_prompts)
        version = self._weights_seq_no

        started = time.perf_counter()
        with self._exit_if_engine_dies():
            groups = self.backend.generate([p.token_ids for p in prompts], sampling)
        generation_s = time.perf_counter() - started

        completions = [c for group in groups for c in group]
        texts = [self.env.decode(c.token_ids) for c in completions]
        sampled_prompts = [p for p in prompts for _ in range(sampling.n)]
        scores = self.env.score(sampled_prompts, texts)

        episodes = EpisodeList()  # pickles column-wise on its way to the driver
        for k, (prompt, completion) in enumerate(zip(sampled_prompts, completions, strict=True)):
            if k % sampling.n == 0:
                group_id = (self.worker_index or 0) * GROUP_ID_STRIDE + self._next_group
                self._next_group += 1
            info = {**row_info(prompt.row), **(scores.infos[k] if scores.infos else {}),
                    "finish_reason": completion.finish_reason}
            episodes.append(self._episode(prompt, completion, scores.rewards[k], info,
                                          group_id, version))
        self._log_sample_metrics(sampled_prompts, completions, texts, scores, sampling.n,
                                 generation_s)
        # The rest of sample() (prompts, grading, episodes) is what generation leaves.
        self.metrics.log_value("sample_time_s", time.perf_counter() - sample_started,
                               reduce="sum")
        return episodes

    def sample_get_state_and_metrics(self):
        """RLlib's asynchronous call (sample, then this runner's state and metrics), with the
        episodes in the reply itself: RLlib puts them in Ray's object store for aggregator
        actors, but LLM algorithms train them in the driver, where that object would only cost
        a put here and a second fetch there per sample."""
        episodes = self.sample()
        return (episodes, self.get_state(not_components=COMPONENT_RL_MODULE),
                self.get_metrics())

    def _episode(self, prompt, completion, reward, info, group_id, version):
        """One finished single-step episode, built from numpy arrays in one constructor call
        (what ``add_env_reset`` + ``add_env_step`` + ``to_numpy`` give, at a quarter of the
        cost). It carries no spaces: they would be pickled with each of the
        ``prompts_per_sample x num_generations`` episodes that go to the driver."""
        width = self.config.max_response_tokens
        action = np.full((1, width), self.eos_id, dtype=np.int64)
        behaviour_logp = np.zeros((1, width), dtype=np.float32)
        length = min(len(completion.token_ids), width)
        action[0, :length] = completion.token_ids[:length]
        behaviour_logp[0, :length] = completion.logprobs[:length]
        observation_space, _ = self._spaces[DEFAULT_MODULE_ID]
        observations = np.full((2, *observation_space.shape), self.pad_id, dtype=np.int64)
        observations[:, :len(prompt.token_ids)] = prompt.token_ids
        extra_model_outputs = {
            BEHAVIOUR_LOGP: behaviour_logp,
            Columns.ACTION_LOGP: behaviour_logp[:, :length].sum(axis=1),
            RESPONSE_LENGTH: np.array([length], dtype=np.int64),
            PROMPT_LENGTH: np.array([len(prompt.token_ids)], dtype=np.int64),
            GROUP_ID: np.array([group_id], dtype=np.int64),
            WEIGHTS_SEQ_NO: np.array([version], dtype=np.int64),
            TRUNCATED_RESPONSE: np.array([completion.finish_reason == "length"],
                                         dtype=np.int64),
        }
        return SingleAgentEpisode(
            observations=observations, actions=action,
            rewards=np.array([reward], dtype=np.float64), infos=[row_info(prompt.row), info],
            terminated=True, extra_model_outputs=extra_model_outputs, len_lookback_buffer=0)

    def _log_sample_metrics(self, prompts, completions, texts, scores, group_size,
                            generation_s):
        m = self.metrics
        count = len(completions)
        lengths = [len(c.token_ids) for c in completions]
        generated = sum(lengths)
        rewards = np.asarray(scores.rewards, dtype=np.float64)
        m.log_value(NUM_ENV_STEPS_SAMPLED, count, reduce="sum")
        m.log_value(NUM_EPISODES, count, reduce="sum")
        m.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, count, reduce="lifetime_sum")
        m.log_value(NUM_EPISODES_LIFETIME, count, reduce="lifetime_sum")
        m.log_value("num_generated_tokens_lifetime", generated, reduce="lifetime_sum")
        for name, value in rollout_statistics(rewards, group_size, lengths).items():
            m.log_value(name, value, reduce="mean")
        for name, values in scores.per_function.items():
            applied = [v for v in values if v is not None]
            if applied:
                m.log_value(("rewards", name), float(np.mean(applied)), reduce="mean")
        if scores.correct is not None:
            m.log_value("accuracy", float(np.mean(scores.correct)), reduce="mean")
        for name, value in scores.counts.items():
            m.log_value(f"num_{name}", value, reduce="lifetime_sum")
        m.log_value("response_length_min", min(lengths), reduce="min")
        m.log_value("response_length_max", max(lengths), reduce="max")
        m.log_value("tokens_per_s", generated / max(generation_s, 1e-9), reduce="mean")
        m.log_value("generation_time_s", generation_s, reduce="sum")
        m.log_value("truncated_response_fraction",
                    float(np.mean([c.finish_reason == "length" for c in completions])),
                    reduce="mean")
        m.log_value("num_empty_responses", sum(not t.strip() for t in texts), reduce="sum")
        m.log_value("num_non_utf8_responses", sum("\ufffd" in t for t in texts), reduce="sum")
        m.log_value(WEIGHTS_SEQ_NO, self._weights_seq_no, reduce="max")
        rows = self.config.completions_table_rows
        if rows:
            # The latest table of each runner; the algorithm collects them in a list.
            m.log_value(COMPLETIONS_TABLE, completions_table(
                prompts[:rows], texts[:rows], scores, rows), reduce="item_series", window=1)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str | None = None, num_problems: int | None = None,
                 temperature: float | None = None) -> dict:
        """Reward (and accuracy, where the task knows it) on a held-out split, greedy by
        default, with this runner's engine."""
        from rllib_ext.llm.evaluation import evaluate_task

        if self.backend is None:
            raise RuntimeError("evaluate() needs a runner with an engine.")
        if self._eval_task is None:
            self._eval_task = self.make_task(split or self.config.eval_split)
        with self._exit_if_engine_dies():
            return evaluate_task(
                self.backend, self._eval_task,
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
        for task in (self.env, self._eval_task):
            if task is not None:
                task.close()
        self.env = self._eval_task = None


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
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only, which torch warns about; the engine
        # copies these tensors into its own parameters and never writes to them.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return {name[len(prefix):] if name.startswith(prefix) else name:
                torch.as_tensor(np.asarray(value)) for name, value in module_state.items()}


def row_info(row) -> dict:
    """What an episode's info keeps of its dataset row: the id and the gold answer."""
    return {key: row[key] for key in (UID, ANSWER) if key in row}


def rollout_statistics(rewards: np.ndarray, group_size: int, lengths: list[int]) -> dict:
    """Over a batch of completions in consecutive groups of ``group_size`` (one prompt each):
    the mean reward, ``reward_std`` the mean over groups of the rewards' standard deviation
    within the group, ``fraction_groups_one_reward`` the fraction of groups whose completions
    all got the same reward (no learning signal under group baselines), and the mean response
    length."""
    groups = rewards.reshape(-1, group_size)
    return {EPISODE_RETURN_MEAN: float(rewards.mean()),
            "reward_std": float(groups.std(axis=1).mean()),
            "fraction_groups_one_reward": float(np.mean(np.ptp(groups, axis=1) == 0)),
            "response_length_mean": float(np.mean(lengths))}


def completions_table(prompts, texts: list[str], scores, rows: int) -> str:
    """A markdown table of the first ``rows`` (prompt, completion, reward) triples."""
    def cell(value) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        return text.replace("|", "\\|").replace("\n", "\\n")[:300]

    names = list(scores.per_function)
    lines = ["| prompt | completion | reward | " + " | ".join(names) + " |",
             "|---" * (3 + len(names)) + "|"]
    for k, (prompt, text) in enumerate(zip(prompts[:rows], texts[:rows], strict=True)):
        values = [scores.per_function[n][k] for n in names]
        lines.append(f"| {cell(prompt.row[PROMPT])} | {cell(text)} | {scores.rewards[k]:.3g} | "
                     + " | ".join("-" if v is None else f"{v:.3g}" for v in values) + " |")
    return "\n".join(lines)
