"""VCPO: variance-controlled off-policy RL for LLMs on RLlib's asynchronous sampling.

The vLLM env runners generate while the learner trains; a sample produced with policy version
v is trained at learner version V >= v, and ``max_staleness`` k bounds V - v by admission
(:mod:`rllib_ext.algorithms.vcpo.staleness`): generation may not run more than k versions ahead,
and finished work is never dropped. k = 0 is the synchronous on-policy baseline. After every
update the new weights go to the env runners, which load them into their engines in place.

The learner (:mod:`.torch.vcpo_torch_learner`) corrects for the lag with sequence-level
truncated importance weights, scales each step's learning rate with the effective sample size,
and uses the off-policy optimal baseline (OPOB). The paper's comparison methods are settings of
the same learner (``correction``, ``baseline``, ``ess_lr_rule``).
"""

from __future__ import annotations

import logging
import time

import ray
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    EVALUATION_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    WEIGHTS_SEQ_NO,
)

from rllib_ext import registry, tiny_build
from rllib_ext.algorithms.vcpo.staleness import StalenessController
from rllib_ext.algorithms.vcpo.torch.step import BASELINES, CORRECTIONS, OPOB_ROUTES
from rllib_ext.algorithms.vcpo.vcpo_learner import group_shards
from rllib_ext.llm import gpu_weight_routes
from rllib_ext.llm.causal_lm_module import CausalLMRLModule
from rllib_ext.llm.env_runner import ENV_STATE, NEXT_GROUP, ROLLOUT_METRICS
from rllib_ext.llm.rollout_config import LLMRolloutConfig
from rllib_ext.llm.weight_sync import FORCE_WEIGHTS, bucket_bytes_from_mb, put_weight_buckets
from rllib_ext.utils.heap import MAX_KEEP_BYTES
from rllib_ext.utils.operation_watch import OperationWatch

ESS_RULES = ("sqrt", "linear", "none")
LEARNER_DTYPES = ("auto", "bfloat16", "float32")

# Algorithm-level metrics (top level of the result dict) and checkpoint state.
VCPO_RESULTS = "vcpo"
RESUMABLE_RUNNER_STATE = (ENV_STATE, NEXT_GROUP)
# How long one pass of the driver's loop waits for a sample in flight (seconds).
COLLECT_WAIT_S = 0.05

logger = logging.getLogger(__name__)


class VCPOConfig(LLMRolloutConfig):
    """Configuration of :class:`VCPO`.

    Example::

        config = (VCPOConfig()
                  .environment("MathEnv", env_config={"dataset": {"name": "arithmetic"}})
                  .llm_rollouts(llm_model="tiny", num_generations=8, prompts_per_sample=8)
                  .training(max_staleness=4, lr=3e-4, train_batch_size_per_learner=64))
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or VCPO)
        # The reference settings (GSM8K recipe) where they apply to every model size.
        self.lr = 1e-6
        self.weight_decay = 0.1
        self.grad_clip = 1.0
        self.grad_clip_by = "global_norm"
        # The learner skips a step whose gradient norm is not finite (VCPOTorchLearner), which
        # is RLlib's skip semantics; RLlib's own per-parameter scan would only repeat it.
        self.torch_skip_nan_gradients = True
        self.train_batch_size_per_learner = 64
        self.num_epochs = 1
        self.minibatch_size = None
        self.max_staleness = 12
        self.is_truncation = 8.0
        self.log_ratio_clamp = 20.0
        self.correction = "seq_tis"
        self.geo_mask_low = 0.5
        self.geo_mask_high = 2.0
        self.ess_lr_rule = "sqrt"
        self.ess_reference_ratio = 1.0
        self.ess_lr_floor = 0.0
        self.baseline = "opob"
        self.opob_grad_norms = "auto"
        self.learner_micro_batch_tokens = "auto"
        self.learner_dtype = "auto"
        self.updates_per_iteration = 1
        self.accuracy_eval_interval = 0
        self.sample_timeout_s = 600.0
        self.weight_sync_timeout_s = 300.0
        self.learner_heap_keep_mb = 512
        # One remote vLLM runner and a local learner fit two CPU cores.
        self.num_env_runners = 1
        self.num_learners = 0
        # A runner holds up to 2 sample requests, so it starts the next generation as soon
        # as one ends (queued requests carry older weights, within max_staleness).
        self.max_requests_in_flight_per_env_runner = 2
        self.restart_failed_env_runners = True
        self.add_default_connectors_to_learner_pipeline = False
        # LLM runners hold no connector states; RLlib's per-iteration state sync would also
        # wait (up to 10 s) behind every in-flight generation, as IMPALA avoids too.
        self._dont_auto_sync_env_runner_states = True
        self.min_sample_timesteps_per_iteration = 0
        self.min_train_timesteps_per_iteration = 0

    def training(self, *, max_staleness=NotProvided, is_truncation=NotProvided,
                 log_ratio_clamp=NotProvided, correction=NotProvided, geo_mask_low=NotProvided,
                 geo_mask_high=NotProvided, ess_lr_rule=NotProvided,
                 ess_reference_ratio=NotProvided, ess_lr_floor=NotProvided,
                 baseline=NotProvided, opob_grad_norms=NotProvided, weight_decay=NotProvided,
                 updates_per_iteration=NotProvided, accuracy_eval_interval=NotProvided,
                 sample_timeout_s=NotProvided, weight_sync_timeout_s=NotProvided,
                 learner_heap_keep_mb=NotProvided, learner_micro_batch_tokens=NotProvided,
                 learner_dtype=NotProvided, **kwargs) -> VCPOConfig:
        """VCPO settings (plus all of ``AlgorithmConfig.training``).

        Args:
            max_staleness: k, the most policy versions a trained sample may lag (0 = sync).
            is_truncation: c in min(w, c) (default 8).
            log_ratio_clamp: the summed log-ratio is clamped to +-this before exp (default 20).
            correction: "seq_tis" (VCPO, default), "none", "token_tis", "masked_is",
                "geo_mask" (geometric-mean sequence masking in [geo_mask_low, geo_mask_high]).
            ess_lr_rule: "sqrt" (default), "linear" or "none"; ess_reference_ratio rho_ref
                (1.0 for math, 0.55 for multi-turn in the paper); ess_lr_floor a lower bound
                on the multiplier.
            baseline: "opob" (off-policy optimal baseline, default) or "grpo".
            opob_grad_norms: how OPOB gets its exact per-trajectory gradient norms: "auto"
                (default: "ghost" for micro-batches of whole groups, "loop" for a group that
                does not fit learner_micro_batch_tokens and with gradient checkpointing),
                "ghost" (one forward + backward with activation capture per micro-batch) or
                "loop" (one forward + backward per trajectory, the reference's route).
            learner_micro_batch_tokens: padded tokens (rows x longest row) per micro-batch of
                the learner step; the step's gradient is exact for any value. "auto" (default):
                16384 on a CPU, on a GPU sized from its free memory; None: the whole batch.
            learner_dtype: "auto" (default: "bfloat16" on a GPU, "float32" on a CPU),
                "bfloat16" (autocast with float32 master weights) or "float32".
            weight_decay: AdamW weight decay (default 0.1).
            updates_per_iteration: learner updates per RLlib iteration (progress line).
            accuracy_eval_interval: evaluate held-out accuracy every N iterations (0 = never).
            sample_timeout_s: longest an env runner's sample() (or evaluation) may run before
                the run stops with an error naming the runner (default 600).
            weight_sync_timeout_s: the same for loading new weights into a runner's engine
                (default 300).
            learner_heap_keep_mb: a CPU learner's process keeps up to this much freed heap
                memory instead of returning it to the OS, which the next step would fault in
                again (glibc; default 512, 0 = the C library's defaults; see
                ``rllib_ext.utils.heap``).
        """
        super().training(**kwargs)
        for name, value in list(locals().items()):
            if name not in ("self", "kwargs", "__class__") and value is not NotProvided:
                setattr(self, name, value)
        return self

    def get_default_learner_class(self):
        from rllib_ext.algorithms.vcpo.torch.vcpo_torch_learner import VCPOTorchLearner

        return VCPOTorchLearner

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=CausalLMRLModule)

    @property
    def sample_size(self) -> int:
        """Trajectories per env-runner sample() call."""
        return self.prompts_per_sample * self.num_generations

    def validate(self) -> None:
        super().validate()
        choices = {"correction": CORRECTIONS, "baseline": BASELINES,
                   "opob_grad_norms": OPOB_ROUTES, "ess_lr_rule": ESS_RULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                self._value_error(f"{name} must be one of {allowed}, got "
                                  f"{getattr(self, name)!r}.")
        if not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            self._value_error(f"max_staleness must be an integer >= 0 (0 = synchronous), got "
                              f"{self.max_staleness!r}.")
        if self.num_generations < 2:
            self._value_error("num_generations must be >= 2: the baselines compare responses "
                              "within a group.")
        batch = self.train_batch_size_per_learner
        if not isinstance(batch, int) or batch % self.sample_size:
            self._value_error(
                f"train_batch_size_per_learner ({batch}) must be a multiple of "
                f"prompts_per_sample x num_generations = {self.sample_size}, so that batches "
                "hold whole groups.")
        if self.minibatch_size is not None and (
                self.minibatch_size % self.num_generations or batch % self.minibatch_size):
            self._value_error(
                f"minibatch_size ({self.minibatch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}) that divides "
                f"train_batch_size_per_learner ({batch}), so minibatches hold whole groups.")
        keep = self.learner_heap_keep_mb
        if not isinstance(keep, int) or not 0 <= keep <= MAX_KEEP_BYTES >> 20:
            self._value_error(f"learner_heap_keep_mb must be an integer in [0, "
                              f"{MAX_KEEP_BYTES >> 20}] (0 = the C library's defaults), got "
                              f"{keep!r}.")
        if not self.is_truncation > 0:
            self._value_error(f"is_truncation must be > 0, got {self.is_truncation}.")
        if not self.ess_reference_ratio > 0 or not 0 <= self.ess_lr_floor <= 1:
            self._value_error("ess_reference_ratio must be > 0 and ess_lr_floor in [0, 1].")
        if not 0 < self.geo_mask_low <= self.geo_mask_high:
            self._value_error("need 0 < geo_mask_low <= geo_mask_high.")
        if self.baseline == "opob" and self.opob_grad_norms == "ghost" \
                and self.model_config.get("gradient_checkpointing"):
            self._value_error("opob_grad_norms='ghost' cannot run with gradient checkpointing. "
                              "Fix: use opob_grad_norms='auto' or 'loop' (the loop route runs "
                              "under checkpointing), or disable checkpointing.")
        tokens = self.learner_micro_batch_tokens
        if not (tokens in ("auto", None) or (isinstance(tokens, int)
                                             and not isinstance(tokens, bool) and tokens > 0)):
            self._value_error(f"learner_micro_batch_tokens must be 'auto', None (no limit) or "
                              f"an integer > 0, got {tokens!r}.")
        if self.learner_dtype not in LEARNER_DTYPES:
            self._value_error(f"learner_dtype must be one of {LEARNER_DTYPES}, got "
                              f"{self.learner_dtype!r}.")



def _evaluate_with(runner, weights) -> dict:
    """On an env runner: load ``weights`` (if newer than its own), then evaluate."""
    runner.set_state(weights)
    return runner.evaluate()


def _put_learner_weights(learner, *, version: int, dtype, bucket_bytes: int):
    """On a learner: its module's weights, in buckets in Ray's object store."""
    module = learner.module[DEFAULT_MODULE_ID]
    return put_weight_buckets(module.hf_state_dict().items(), version=version,
                              bucket_bytes=bucket_bytes, dtype=dtype)


class VCPO(Algorithm):
    """Asynchronous VCPO training loop (see the module docstring)."""

    progress_metrics = (
        ("acc", "env_runners/accuracy", "{:.1%}"),
        ("heldout", "evaluation/accuracy", "{:.1%}"),
        ("ess", "learners/default_policy/ess_ratio", "{:.2f}"),
        ("staleness", "learners/default_policy/staleness_mean", "{:.1f}"),
        ("samples/s", "vcpo/samples_per_s", "{:.0f}"),
    )

    # Where the runners' ROLLOUT_METRICS go (the rest of their metrics: env_runners/).
    rollout_metrics_group = VCPO_RESULTS

    @classmethod
    def get_default_config(cls) -> VCPOConfig:
        return VCPOConfig()

    # Project env names ("MathEnv", ...) resolve also when built from Python.
    _get_env_id_and_creator = staticmethod(registry.env_id_and_creator)

    def setup(self, config) -> None:
        tiny_build.ensure_built(config.llm_model)  # before runners and learners load it
        super().setup(config)
        self._staleness = self._new_staleness_controller()
        # Algorithm.setup already pushed version 0 to every runner.
        self._sent_version = {i: 0 for i in self.env_runner_group.healthy_env_runner_ids()}
        self._weights = None
        self._weights_version = -1
        self._engine_dtype = self._query_engine_dtype()
        self._gpu_route = None if self.config.weight_sync_route == "buckets" else \
            gpu_weight_routes.start_route(self.config, self._learner_model, self._engine_dtype)
        self._runner_states: dict[int, dict] = {}
        self._watch = OperationWatch({"sample": self.config.sample_timeout_s,
                                      "set_state": self.config.weight_sync_timeout_s})

    def _new_staleness_controller(self, learner_version: int = 0) -> StalenessController:
        return StalenessController(
            # As in RLlib: train_batch_size_per_learner trajectories for each learner.
            self.config.max_staleness, self.config.total_train_batch_size,
            max_requests_per_runner=self.config.max_requests_in_flight_per_env_runner,
            learner_version=learner_version)

    def _query_engine_dtype(self):
        """The engines' weight dtype (weights are sent in it), asked of one env runner."""
        import torch

        if self.env_runner_group.num_remote_env_runners() == 0:
            name = self.env_runner.weight_dtype()
        else:
            name = self.env_runner_group.foreach_env_runner(
                lambda runner: runner.weight_dtype(), local_env_runner=False)[0]
        return getattr(torch, name)

    def _learner_model(self):
        """The local learner's Hugging Face model (the GPU routes send from it)."""
        results = self.learner_group.foreach_learner(
            lambda learner: learner.module[DEFAULT_MODULE_ID].model)
        return next(iter(results)).get()

    # ------------------------------------------------------------------ the loop

    def training_step(self) -> None:
        started = time.perf_counter()
        trained = learner_s = 0.0
        for _ in range(self.config.updates_per_iteration):
            trained_now, learner_now = self._one_update()
            trained += trained_now
            learner_s += learner_now
        wall = time.perf_counter() - started
        self.metrics.log_value((VCPO_RESULTS, "samples_per_s"), trained / wall, window=1)
        self.metrics.log_value((VCPO_RESULTS, "learner_busy_fraction"), learner_s / wall,
                               window=1)
        self.metrics.log_value((VCPO_RESULTS, "policy_version"),
                               self._staleness.learner_version, window=1)
        if self.config.accuracy_eval_interval and \
                (self.iteration + 1) % self.config.accuracy_eval_interval == 0:
            self.evaluate_accuracy()

    def _one_update(self) -> tuple[int, float]:
        """One learner update; the driver's time per phase goes to ``vcpo/time_*_s`` (mean
        over the iteration's updates): waiting for an admissible batch (generation that did
        not overlap the learner, and fetching episodes), the learner update (RLlib's learner
        connector and the step), and the weight push with the next requests."""
        clock = time.perf_counter
        started = clock()
        if self.env_runner_group.num_remote_env_runners() == 0:
            batch = self._sample_locally()
        else:
            batch = self._wait_for_admissible_batch()
        episodes = [episode for sample in batch for episode in sample.payload]
        self._staleness.trained(batch)
        waited = clock()
        # Several learners: each gets whole groups (RLlib's own split ignores groups).
        data = {"episodes": episodes} if self.config.num_learners <= 1 else {
            "episodes_refs": [ray.put(shard) for shard in
                              group_shards(episodes, self.config.num_learners)]}
        results = self.learner_group.update(
            **data,
            timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)},
            num_epochs=self.config.num_epochs, minibatch_size=self.config.minibatch_size,
            shuffle_batch_per_epoch=False)
        updated = clock()
        self.metrics.aggregate(results, key=LEARNER_RESULTS)
        if self.env_runner_group.num_remote_env_runners() > 0:
            # The new weights go out with the next request of every runner: a request always
            # carries (is queued right behind) the weights that are current when it starts.
            self._launch()
        else:
            self.env_runner.set_state(self._current_weights())
        for phase, seconds in (("wait_for_samples", waited - started),
                               ("learner_update", updated - waited),
                               ("weight_push", clock() - updated)):
            self._log_time(phase, seconds)
        return len(episodes), updated - waited

    def _log_time(self, phase: str, seconds: float) -> None:
        self.metrics.log_value((VCPO_RESULTS, f"time_{phase}_s"), seconds, reduce="mean",
                               window=self.config.updates_per_iteration)

    def _aggregate_runner_metrics(self, metrics: list[dict]) -> None:
        """The runners' ROLLOUT_METRICS (reward spread, per-function rewards, lengths, sample
        completions) under vcpo/ beside the loop's own; the rest under env_runners/."""
        for key, wanted in ((self.rollout_metrics_group, True), (ENV_RUNNER_RESULTS, False)):
            self.metrics.aggregate([{name: value for name, value in m.items()
                                     if (name in ROLLOUT_METRICS) == wanted} for m in metrics],
                                   key=key)

    def _sample_locally(self):
        """No remote runners: the local runner samples synchronously (k is moot)."""
        while (batch := self._staleness.next_batch()) is None:
            self._staleness.launched(0, self.config.sample_size, self._staleness.learner_version)
            episodes = self.env_runner.sample()
            self._aggregate_runner_metrics([self.env_runner.get_metrics()])
            self._staleness.arrived(0, self._version_of(episodes), len(episodes), episodes)
        return batch

    def _wait_for_admissible_batch(self):
        runners_down_since = None
        # The first pass takes what has arrived without waiting: the batch is the oldest
        # admissible samples, so waiting for a request in flight could only delay it
        # (measured: up to 50 ms per update of an idle learner).
        wait_s = 0.0
        while True:
            self._collect(wait_s)
            self._launch()
            batch = self._staleness.next_batch()
            if batch is not None:
                return batch
            wait_s = COLLECT_WAIT_S
            overdue = self._watch.overdue()
            if overdue:  # answered but not fetched yet? look once more, then fail
                self._collect(wait_s=1.0)
                overdue = self._watch.overdue()
            if overdue:
                raise TimeoutError(
                    f"{overdue}. Fix: look at that env runner's log (the trial's stdout) for "
                    "what it is stuck on; raise sample_timeout_s / weight_sync_timeout_s if "
                    "generations or weight loads are legitimately that slow.")
            if self._staleness.in_flight or self._watch.busy_actor_ids():
                runners_down_since = None
                continue
            if self.env_runner_group.healthy_env_runner_ids():
                # Nothing is running and nothing can start: waiting cannot help.
                buffered = sorted((s.version, s.size) for s in self._staleness.buffer)
                raise RuntimeError(
                    "VCPO cannot form a train batch: no request in flight, none admitted, and "
                    f"the buffered samples ((version, size): {buffered}) cannot be trained at "
                    f"learner version {self._staleness.learner_version} within max_staleness="
                    f"{self.config.max_staleness}. An env runner stamped its samples with a "
                    "policy version older than the weights it was sent. Fix: a custom env "
                    "runner must stamp WEIGHTS_SEQ_NO with the version of the weights it "
                    "generated with, as loaded by its set_state().")
            # Every runner is down: RLlib's fault tolerance brings them back.
            runners_down_since = runners_down_since or time.monotonic()
            if time.monotonic() - runners_down_since > self.config.sample_timeout_s:
                raise TimeoutError(
                    f"no env runner has been healthy for {self.config.sample_timeout_s:.0f} s "
                    "(RLlib could not restart them). Fix: look at the env runners' errors in "
                    "the trial's log.")
            self.restore_env_runners(self.env_runner_group)
            time.sleep(0.5)

    def _collect(self, wait_s: float = COLLECT_WAIT_S) -> None:
        """Fetch finished samples (waiting up to ``wait_s``) into the staleness buffer."""
        group = self.env_runner_group
        syncs = group.fetch_ready_async_reqs(tags="set_state",
                                             timeout_seconds=0.0 if wait_s < 1 else wait_s)
        for runner_id, _ in syncs:
            self._watch.answered(runner_id, "set_state")
        self._wait_for_first("sample", wait_s)
        results = group.fetch_ready_async_reqs(tags="sample", timeout_seconds=0.0)
        metrics = []
        for runner_id, (episodes, state, runner_metrics) in results:
            self._watch.answered(runner_id, "sample")
            # Data position as of this finished sample (what a restore resumes from).
            self._runner_states[runner_id] = {k: state[k] for k in RESUMABLE_RUNNER_STATE
                                              if k in state}
            metrics.append(runner_metrics)
            self._staleness.arrived(runner_id, self._version_of(episodes), len(episodes),
                                    episodes)
        if metrics:
            self._aggregate_runner_metrics(metrics)
        healthy = set(group.healthy_env_runner_ids())
        for runner_id in list(self._staleness.in_flight):
            if runner_id not in healthy:
                self._staleness.lost(runner_id)
                self._watch.forget(runner_id)

    def _wait_for_first(self, tag: str, wait_s: float) -> None:
        """Return as soon as one request tagged ``tag`` has finished (or after ``wait_s``).

        RLlib's ``fetch_ready_async_reqs`` waits for *all* of the tag's requests until its
        timeout: with two samples queued on a runner, a finished one would sit there for the
        whole timeout (measured: 25-50 ms per update of an idle learner on the tiny recipe)."""
        calls, _, _ = self.env_runner_group._worker_manager._filter_calls_by_tag(tag)
        if calls:
            ray.wait(calls, num_returns=1, timeout=wait_s)

    def _launch(self) -> None:
        """Start a sample on every idle runner the staleness bound admits, with current weights."""
        version = self._staleness.learner_version
        for runner_id in self.env_runner_group.healthy_env_runner_ids():
            while self._staleness.can_launch(runner_id, self.config.sample_size):
                if self._sent_version.get(runner_id, -1) < version:
                    self._push_weights([runner_id])
                    if self._sent_version.get(runner_id, -1) < version:
                        break  # its weight queue is full; try again on the next pass
                if not self.env_runner_group.foreach_env_runner_async(
                        "sample_get_state_and_metrics", tag="sample",
                        remote_worker_ids=[runner_id]):
                    break
                self._staleness.launched(runner_id, self.config.sample_size, version)
                self._watch.sent(runner_id, "sample", f"sample() with policy version {version}")

    # ------------------------------------------------------------------ weights

    def _current_weights(self) -> dict:
        """The runner state that carries the current weights: a manifest of their buckets in
        Ray's object store (packed once per version, shared by every runner)."""
        version = self._staleness.learner_version
        if self._weights_version != version:
            self._weights = None  # the previous version's buckets can go
            started = time.perf_counter()
            results = self.learner_group.foreach_learner(
                _put_learner_weights, version=version, dtype=self._engine_dtype,
                bucket_bytes=bucket_bytes_from_mb(self.config.weight_sync_bucket_mb))
            manifest = next(iter(results)).get()
            self.metrics.log_value((VCPO_RESULTS, "weight_pack_time_s"),
                                   time.perf_counter() - started, window=1)
            self._weights = {COMPONENT_RL_MODULE: manifest, WEIGHTS_SEQ_NO: version}
            self._weights_version = version
        return self._weights

    def _push_weights(self, runner_ids) -> None:
        """Queue the current weights on these runners (after their in-flight sample); on a
        GPU route, transfer them now (the transfer waits for the runner's queue)."""
        version = self._staleness.learner_version
        for runner_id in runner_ids:
            if self._sent_version.get(runner_id, -1) >= version:
                continue
            if self._gpu_route is not None and self._transfer_on_gpu_route(runner_id, version):
                self._sent_version[runner_id] = version
                continue
            if self.env_runner_group.foreach_env_runner_async(
                    "set_state", tag="set_state", kwargs={"state": self._current_weights()},
                    remote_worker_ids=[runner_id]):
                self._sent_version[runner_id] = version
                self._watch.sent(runner_id, "set_state", f"weight sync to version {version}")

    def _transfer_on_gpu_route(self, runner_id: int, version: int) -> bool:
        """Send the weights on the GPU route; False (and the bucketed route from now on, the
        reason logged) if the route cannot start."""
        actor = self.env_runner_group._worker_manager.actors()[runner_id]
        try:
            self._gpu_route.start(runner_id, actor)
        except Exception as error:  # any failure to rendezvous: the buckets always work
            logger.warning("weight_sync_route '%s' could not start (%r): weights go in "
                           "buckets.", self.config.weight_sync_route, error)
            self._gpu_route = None
            return False
        started = time.perf_counter()
        self._gpu_route.send(runner_id, version)
        self.metrics.log_value((VCPO_RESULTS, "weight_transfer_time_s"),
                               time.perf_counter() - started, window=1)
        return True

    @staticmethod
    def _version_of(episodes) -> int:
        return min(int(e.get_extra_model_outputs(WEIGHTS_SEQ_NO, 0)) for e in episodes)

    # ------------------------------------------------------------------ evaluation

    def evaluate_accuracy(self) -> dict:
        """Held-out accuracy with the current weights, on one env runner's engine."""
        runner_ids = self.env_runner_group.healthy_env_runner_ids()
        if runner_ids:
            # The weights travel with the call: a queued weight push can be refused while the
            # runner's request queue is full, and the evaluation would see older weights.
            weights = self._current_weights()
            results = self.env_runner_group.foreach_env_runner(
                lambda runner, w=weights: _evaluate_with(runner, w),
                remote_worker_ids=runner_ids[:1], local_env_runner=False,
                timeout_seconds=self.config.sample_timeout_s)
            if not results:
                raise TimeoutError(
                    f"env runner {runner_ids[0]}: evaluate() has not returned after "
                    f"{self.config.sample_timeout_s:.0f} s (limit sample_timeout_s). Fix: look "
                    "at that env runner's log; lower eval_num_problems or raise the limit.")
            [result] = results
            self._sent_version[runner_ids[0]] = max(self._sent_version.get(runner_ids[0], -1),
                                                    self._staleness.learner_version)
        else:
            result = self.env_runner.evaluate()
        result["policy_version"] = self._staleness.learner_version
        for key, value in result.items():
            self.metrics.log_value((EVALUATION_RESULTS, key), value, window=1)
        return result

    # ------------------------------------------------------------------ checkpoints

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        """Adds what RLlib's state lacks for an asynchronous LLM run: each remote runner's
        position in its data shard (as of its last finished sample), the finished but not yet
        trained samples, and the staleness bookkeeping. Requests in flight are not saved:
        their prompts are generated again after a restore (never skipped)."""
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component(VCPO_RESULTS, components, not_components):
            state[VCPO_RESULTS] = {
                "learner_version": self._staleness.learner_version,
                "runner_states": dict(self._runner_states),
                "buffer": [(s.version, s.size, s.payload) for s in self._staleness.buffer],
            }
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if VCPO_RESULTS not in state:
            return
        saved = state[VCPO_RESULTS]
        self._staleness = self._new_staleness_controller(saved["learner_version"])
        for version, size, payload in saved["buffer"]:
            self._staleness.arrived(-1, version, size, payload)
        self._runner_states = dict(saved["runner_states"])
        self._weights_version = -1  # the learner's weights were just replaced
        runner_ids = self.env_runner_group.healthy_env_runner_ids()
        weights = {**self._current_weights(), FORCE_WEIGHTS: True}
        for runner_id in runner_ids:
            runner_state = {**weights, **self._runner_states.get(runner_id, {})}
            self.env_runner_group.foreach_env_runner(
                lambda runner, s=runner_state: runner.set_state(s),
                remote_worker_ids=[runner_id], local_env_runner=False,
                timeout_seconds=self.config.sample_timeout_s)
            self._sent_version[runner_id] = self._staleness.learner_version
        if not runner_ids:
            self.env_runner.set_state(weights)

    # ------------------------------------------------------------------ fault tolerance

    def cleanup(self) -> None:
        # RLlib's stop calls every env runner without a time limit: a runner still busy (or
        # stuck) would hold it. Busy runners are killed instead; their engines exit with them.
        manager = self.env_runner_group._worker_manager
        for runner_id in self._watch.busy_actor_ids():
            if runner_id in manager.actor_ids():
                ray.kill(manager.remove_actor(runner_id), no_restart=True)
        super().cleanup()

    def restore_env_runners(self, env_runner_group):
        restored = super().restore_env_runners(env_runner_group)
        for runner_id in restored or []:
            # A restarted runner lost its request and holds its initial weights.
            self._staleness.lost(runner_id)
            self._watch.forget(runner_id)
            self._sent_version[runner_id] = -1
            if self._gpu_route is not None:
                self._gpu_route.forget(runner_id)
        if restored:
            self.metrics.log_value((VCPO_RESULTS, "num_env_runner_restarts"), len(restored),
                                   reduce="lifetime_sum")
        return restored
