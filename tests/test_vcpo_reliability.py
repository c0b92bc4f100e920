"""Reliability of VCPO runs with the real vLLM engine: failed env runners and engines are
restarted, stalls end in clear errors, and bad samples are counted, never fatal."""

import dataclasses
import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from ray import cloudpickle
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig
from rllib_ext.llm.env_runner import LLMEnvRunner
from rllib_ext.llm.tiny import EOS_ID, TINY_ARITHMETIC_DATASET
from rllib_ext.llm.weight_sync import FORCE_WEIGHTS, WeightManifest

pytestmark = pytest.mark.slow

# Runner subclasses defined here travel to Ray workers by value (Ray's own cloudpickle).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def config(**training):
    settings = dict(lr=1e-4, weight_decay=0.0, train_batch_size_per_learner=16,
                    max_staleness=2, updates_per_iteration=2)
    settings.update(training)
    return (VCPOConfig().environment("MathEnv", env_config={"dataset": TINY_ARITHMETIC_DATASET})
            .llm_rollouts(prompts_per_sample=4, num_generations=4, max_response_tokens=6)
            .training(**settings).debugging(seed=0))


def build(cfg):
    return cfg.build_algo()


def runner_call(algo, fn):
    [result] = algo.env_runner_group.foreach_env_runner(fn, local_env_runner=False)
    return result


def finetuned_state(model_path: str, target: str, eos: bool, steps: int = 60) -> dict:
    """RLlib module state of the tiny model trained for a few steps to answer every problem
    with ``target`` (followed by <eos> if ``eos``): a real policy with a chosen behaviour."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs.math.datasets import load_rows

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems = load_rows(TINY_ARITHMETIC_DATASET, "train").rows[:64]
    answer = tokenizer(target, add_special_tokens=False).input_ids + ([EOS_ID] if eos else [])
    rows = [tokenizer(p["prompt"]).input_ids for p in problems]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        length = max(len(r) for r in rows) + len(answer)
        ids = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100)
        for i, prompt in enumerate(rows):
            ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            labels[i, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != 0),
                     labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {f"model.{k}": v.detach().numpy() for k, v in model.state_dict().items()}


def train_until(algo, accept, iterations=3):
    """Train up to ``iterations`` iterations (samples already queued on the runner still use
    the previous weights); return the results, the last one first satisfying ``accept``."""
    results = []
    for _ in range(iterations):
        results.append(algo.train())
        if accept(results[-1]):
            break
    return results


class HoldsForcedWeightsRunner(LLMEnvRunner):
    """Generates its next sample with forced weights: newer weights, which the algorithm sends
    with the next request, wait until that sample is done. (Without the hold, forced weights
    would be replaced before any request used them.)"""

    held = False
    pending = None

    def set_state(self, state):
        if state.get(FORCE_WEIGHTS):
            self.held = True
        elif self.held and COMPONENT_RL_MODULE in state:
            # The forced weights stand in for the version sent, as the algorithm expects.
            self.pending = {**state, FORCE_WEIGHTS: True}
            self._weights_seq_no = max(self._weights_seq_no, int(state[WEIGHTS_SEQ_NO]))
            return
        super().set_state(state)

    def sample(self, **kwargs):
        episodes = super().sample(**kwargs)
        if self.held:
            self.held = False
            if self.pending is not None:
                super().set_state(self.pending)
                self.pending = None
        return episodes


class StampsInitialVersionRunner(LLMEnvRunner):
    """A buggy runner: stamps every sample with policy version 0."""

    def sample(self, **kwargs):
        self._weights_seq_no = 0
        return super().sample(**kwargs)


def force_engine_weights(algo, module_state) -> None:
    """Load weights into the runner's engine for its next sample, stamped with the learner's
    current version (the runner must be a ``HoldsForcedWeightsRunner``)."""
    version = algo.get_state()["vcpo"]["learner_version"]
    state = {COMPONENT_RL_MODULE: module_state, WEIGHTS_SEQ_NO: version, FORCE_WEIGHTS: True}
    runner_call(algo, lambda runner, s=state: runner.set_state(s))


@pytest.fixture(scope="module")
def algo(ray_session, tiny_model_path):
    algorithm = build(config().env_runners(env_runner_cls=HoldsForcedWeightsRunner))
    algorithm.train()
    yield algorithm
    algorithm.stop()


# ------------------------------------------------------------------ failures of env runners


def test_killed_env_runner_is_restarted_and_no_step_is_lost(algo):
    before = algo.train()
    pid = runner_call(algo, lambda runner: os.getpid())
    os.kill(pid, signal.SIGKILL)
    results = [algo.train() for _ in range(2)]
    assert [r["training_iteration"] for r in results] == \
        [before["training_iteration"] + 1, before["training_iteration"] + 2]
    # Every iteration took exactly its 2 learner steps: none lost, none repeated.
    assert results[-1]["vcpo"]["policy_version"] == before["vcpo"]["policy_version"] + 4
    assert results[-1]["vcpo"]["num_env_runner_restarts"] >= 1
    assert runner_call(algo, lambda runner: os.getpid()) != pid


def test_killed_engine_process_restarts_the_runner(ray_session, tiny_model_path):
    # vLLM's own layout: the engine core in a child process of the runner (the GPU default;
    # on CPU the engine lives in the runner's process and dies with it, the test above).
    algorithm = build(config().llm_rollouts(engine_in_process=False))
    try:
        before = algorithm.train()
        pid = runner_call(algorithm, lambda runner: os.getpid())
        engines = [p for p in psutil.Process(pid).children(recursive=True)
                   if "python" in p.name().lower() or "VLLM" in " ".join(p.cmdline())]
        assert engines, "the runner's vLLM engine core process was not found"
        for engine in engines:
            engine.kill()
        results = [algorithm.train() for _ in range(2)]
        assert results[-1]["vcpo"]["policy_version"] == before["vcpo"]["policy_version"] + 4
        assert results[-1]["vcpo"]["num_env_runner_restarts"] >= 1
        assert runner_call(algorithm, lambda runner: os.getpid()) != pid
    finally:
        algorithm.stop()


class LosesOneWeightBucketRunner(LLMEnvRunner):
    """Loses bucket 1 of the first bucketed weight update of the run (``marker``, a file, keeps
    the restarted runner from losing another)."""

    marker = None

    def set_state(self, state):
        manifest = state.get(COMPONENT_RL_MODULE)
        if isinstance(manifest, WeightManifest) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            refs = manifest.bucket_refs
            state = {**state, COMPONENT_RL_MODULE: dataclasses.replace(
                manifest, bucket_refs=refs[:1] + refs[2:])}
        return super().set_state(state)


def test_a_lost_weight_bucket_restarts_the_runner_and_no_step_is_lost(ray_session,
                                                                    tiny_model_path,
                                                                    tmp_path):
    marker = tmp_path / "bucket-lost"
    runner_cls = type("LosesOneBucket", (LosesOneWeightBucketRunner,), {"marker": str(marker)})
    # The tiny model's 1.8 MB cross in 7 buckets.
    algorithm = build(config().llm_rollouts(weight_sync_bucket_mb=0.25)
                      .env_runners(env_runner_cls=runner_cls))
    started = time.monotonic()
    try:
        results = [algorithm.train() for _ in range(3)]
        assert marker.exists()
        assert results[-1]["vcpo"]["num_env_runner_restarts"] >= 1
        assert [r["vcpo"]["policy_version"] for r in results] == [2, 4, 6]
        assert time.monotonic() - started < 300
    finally:
        algorithm.stop()


# ------------------------------------------------------------------ bad samples


def test_empty_completions_are_counted_and_training_goes_on(algo, tiny_model_path):
    force_engine_weights(algo, finetuned_state(tiny_model_path, "", eos=True))
    results = train_until(algo, lambda r: r["env_runners"]["num_empty_responses"] > 0)
    assert results[-1]["env_runners"]["num_empty_responses"] > 0
    assert algo.train()["training_iteration"] == results[-1]["training_iteration"] + 1


def test_completions_hitting_max_tokens_are_counted_and_training_goes_on(algo,
                                                                        tiny_model_path):
    force_engine_weights(algo, finetuned_state(tiny_model_path, "1111111111", eos=False))
    results = train_until(algo, lambda r: r["vcpo"]["truncated_response_fraction"] > 0)
    assert results[-1]["vcpo"]["truncated_response_fraction"] > 0
    assert np.isfinite(results[-1]["learners"]["default_policy"]["total_loss"])
    assert algo.train()["training_iteration"] == results[-1]["training_iteration"] + 1


def test_non_finite_behaviour_log_probs_skip_the_step_and_training_goes_on(algo,
                                                                          tiny_model_path):
    state = algo.learner_group.get_state(components=COMPONENT_LEARNER + "/" + COMPONENT_RL_MODULE,
                                         inference_only=True)[COMPONENT_LEARNER]
    broken = {k: np.full_like(v, np.nan) if "norm" in k else v
              for k, v in state[COMPONENT_RL_MODULE]["default_policy"].items()}
    force_engine_weights(algo, broken)
    def skipped(result):  # lifetime count
        return result["learners"]["__all_modules__"]["num_skipped_nonfinite_steps"]

    results = train_until(algo, lambda r: skipped(r) >= 1)
    assert skipped(results[-1]) >= 1
    # The learner's finite weights reach the engine again: steps stop being skipped.
    after = [algo.train() for _ in range(3)]
    assert skipped(after[-1]) == skipped(after[-2])
    assert np.isfinite(after[-1]["learners"]["default_policy"]["total_loss"])


def test_non_utf8_decodes_are_counted_and_training_goes_on(ray_session, tiny_model_path,
                                                          tmp_path):
    # A tokenizer whose "~" token decodes to U+FFFD, like a byte-level token cut mid-character,
    # and weights that answer "~~".
    variant = tmp_path / "tiny-fffd"
    shutil.copytree(tiny_model_path, variant)
    tokenizer_file = variant / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    vocab = spec["model"]["vocab"]
    vocab["\ufffd"] = vocab.pop("~")
    tokenizer_file.write_text(json.dumps(spec))
    state = finetuned_state(tiny_model_path, "~~", eos=True)
    from safetensors.torch import save_file

    save_file({k[len("model."):]: torch.from_numpy(v) for k, v in state.items()},
              str(variant / "model.safetensors"))
    algorithm = build(config().llm_rollouts(llm_model=str(variant)))
    try:
        results = train_until(algorithm, lambda r: r["env_runners"]["num_non_utf8_responses"])
        assert results[-1]["env_runners"]["num_non_utf8_responses"] > 0
        assert algorithm.train()["training_iteration"] == len(results) + 1
    finally:
        algorithm.stop()


@pytest.mark.parametrize("verifier, counter", [
    ("rllib_ext.testing:raising_on_odd_gold", "num_checker_errors"),
    ("rllib_ext.testing:hanging_on_odd_gold", "num_checker_timeouts"),
])
def test_reward_checker_failures_are_counted_and_training_goes_on(ray_session, tiny_model_path,
                                                                  verifier, counter):
    cfg = config().environment(env_config={"dataset": TINY_ARITHMETIC_DATASET,
                                           "answer_verifier": verifier,
                                           "checker_timeout_s": 0.3})
    algorithm = build(cfg)
    try:
        results = train_until(algorithm, lambda r: r["env_runners"][counter] > 0)
        assert results[-1]["env_runners"][counter] > 0
        assert algorithm.train()["training_iteration"] == len(results) + 1
    finally:
        algorithm.stop()


# ------------------------------------------------------------------ stalls end in clear errors


class StallingSampleRunner(LLMEnvRunner):
    """Its second sample() never returns."""

    calls = 0

    def sample(self, **kwargs):
        type(self).calls += 1
        if type(self).calls > 1:
            time.sleep(3600)
        return super().sample(**kwargs)


class StallingWeightsRunner(LLMEnvRunner):
    """Never finishes loading weights of version >= 1."""

    def set_state(self, state):
        if state.get(WEIGHTS_SEQ_NO, 0) >= 1 and COMPONENT_RL_MODULE in state:
            time.sleep(3600)
        return super().set_state(state)


@pytest.mark.parametrize("runner_cls, expected", [
    (StallingSampleRunner, "sample() with policy version"),
    (StallingWeightsRunner, "weight sync to version 1"),
])
def test_a_stalled_env_runner_ends_the_run_with_a_clear_error(ray_session, tiny_model_path,
                                                              runner_cls, expected):
    cfg = config(sample_timeout_s=8.0, weight_sync_timeout_s=8.0, max_staleness=0,
                 updates_per_iteration=1).env_runners(
        env_runner_cls=runner_cls, max_requests_in_flight_per_env_runner=1)
    algorithm = build(cfg)
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as error:
            for _ in range(4):
                algorithm.train()
        message = str(error.value)
        assert "env runner 1" in message and expected in message, message
        assert "has not returned after" in message and "limit 8 s" in message
        assert time.monotonic() - started < 120
    finally:
        algorithm.stop()


def test_samples_stamped_too_old_end_the_run_with_a_clear_error(ray_session, tiny_model_path):
    algorithm = build(config(max_staleness=1, updates_per_iteration=1).env_runners(
        env_runner_cls=StampsInitialVersionRunner))
    try:
        with pytest.raises(RuntimeError, match="cannot form a train batch") as error:
            for _ in range(5):
                algorithm.train()
        assert "within max_staleness=1" in str(error.value)
        assert "Fix: a custom env runner must stamp WEIGHTS_SEQ_NO" in str(error.value)
    finally:
        algorithm.stop()


def test_operation_watch_names_the_overdue_operation():
    from rllib_ext.utils.operation_watch import OperationWatch

    now = [0.0]
    watch = OperationWatch({"sample": 10.0, "set_state": 5.0}, clock=lambda: now[0])
    watch.sent(1, "sample", "sample() with policy version 3")
    watch.sent(1, "set_state", "weight sync to version 4")
    now[0] = 9.0
    assert watch.overdue() is None
    watch.answered(1, "sample")  # at t=9 the weight sync starts running
    now[0] = 13.0
    assert watch.overdue() is None
    now[0] = 14.5
    assert watch.overdue() == ("env runner 1: weight sync to version 4 has not returned after "
                               "6 s (limit 5 s)")
    watch.forget(1)
    assert watch.overdue() is None
