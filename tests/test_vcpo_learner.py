"""The VCPO learner against hand computations: loss, ESS-scaled step, OPOB routes, staleness,
skipped non-finite steps. Episodes come from a real LLMEnvRunner (transformers backend)."""

import copy

import numpy as np
import pytest
import torch
from ray.rllib.core import ALL_MODULES, DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import LEARNER_RESULTS, WEIGHTS_SEQ_NO
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from rllib_ext.algorithms.vcpo import losses
from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig
from rllib_ext.llm.causal_lm_module import RESPONSE_LOGP, response_log_probs
from rllib_ext.llm.env_runner import BEHAVIOUR_LOGP, LLMEnvRunner
from rllib_ext.llm.learner_connector import episodes_to_lm_batch
from rllib_ext.llm.tiny import TINY_ARITHMETIC_DATASET

N, PROMPTS = 4, 4


def config(**training):
    settings = dict(lr=1e-3, weight_decay=0.0, grad_clip=None,
                    train_batch_size_per_learner=N * PROMPTS, max_staleness=4)
    settings.update(training)
    return (VCPOConfig()
            .environment("MathEnv", env_config={"dataset": TINY_ARITHMETIC_DATASET})
            .llm_rollouts(generation_backend="transformers", num_generations=N,
                          prompts_per_sample=PROMPTS, max_response_tokens=5)
            .training(**settings).env_runners(num_env_runners=0).debugging(seed=0))


@pytest.fixture(scope="module")
def episodes(tiny_model_path):
    runner = LLMEnvRunner(config=config(), worker_index=0, num_workers=0)
    samples = runner.sample()
    runner.stop()
    assert 0 < np.mean([e.get_rewards(0) for e in samples]) < 1  # some groups have spread
    return samples


def build(**training):
    cfg = config(**training)
    runner = LLMEnvRunner(config=cfg, worker_index=0, num_workers=1)  # spaces only
    return cfg.build_learner(spaces={DEFAULT_MODULE_ID: runner.get_spaces()[DEFAULT_MODULE_ID]})


def lm_batch(episodes):
    return {k: torch.as_tensor(v) for k, v in episodes_to_lm_batch(episodes).items()}


def with_behaviour_shift(episodes, shifts):
    """Copies of the episodes whose behaviour log-probs are lowered by shift_i on their first
    token (so the sequence IS weight is exactly exp(shift_i) when the policy is unchanged)."""
    shifted = []
    for episode, shift in zip(episodes, shifts):
        episode = copy.deepcopy(episode)
        logp = episode.extra_model_outputs[BEHAVIOUR_LOGP]
        values = logp.get(0).copy()
        values[0] -= shift
        logp.set(values, at_indices=0)
        shifted.append(episode)
    return shifted


def update_and_capture_gradients(learner, episodes):
    """Run one update; return it results and the flat gradient the optimiser received."""
    captured = {}
    original = learner.apply_gradients
    learner.apply_gradients = lambda grads: captured.update(grads) or original(grads)
    results = learner.update(episodes=episodes)
    learner.apply_gradients = original
    params = learner.module[DEFAULT_MODULE_ID].model.parameters()
    return results, torch.cat([captured[learner.get_param_ref(p)].reshape(-1) for p in params])


def module_params(learner):
    return {n: p.detach().clone() for n, p in learner.module[DEFAULT_MODULE_ID].named_parameters()}


def test_grpo_loss_equals_hand_computation(episodes):
    learner = build(correction="none", baseline="grpo", ess_lr_rule="none")
    batch = lm_batch(episodes)
    model = learner.module[DEFAULT_MODULE_ID].model
    with torch.no_grad():
        logp = response_log_probs(model, batch).numpy()
    rewards = batch["rewards"].numpy().reshape(PROMPTS, N)
    mean, std = rewards.mean(1, keepdims=True), rewards.std(1, ddof=1, keepdims=True)
    advantages = np.where(std > 1e-6, (rewards - mean) / (std + 1e-6), 0.0).reshape(-1)
    seq_logp = (logp * batch["response_mask"].numpy()).sum(1)
    expected = -(advantages * seq_logp).sum() / (N * PROMPTS * 5)
    results = learner.update(episodes=episodes)
    loss = results[DEFAULT_MODULE_ID]["total_loss"].peek()
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_ess_scales_the_learning_rate_of_the_step(episodes):
    shifts = np.linspace(-1.5, 1.5, len(episodes))
    weights = np.exp(shifts)
    ess_ratio = weights.sum() ** 2 / (weights ** 2).sum() / len(weights)
    for rule, expected_scale in (("sqrt", np.sqrt(ess_ratio)), ("linear", ess_ratio),
                                 ("none", 1.0)):
        learner = build(ess_lr_rule=rule, baseline="grpo")
        results = learner.update(episodes=with_behaviour_shift(episodes, shifts))
        stats = results[DEFAULT_MODULE_ID]
        assert stats["ess_ratio"].peek() == pytest.approx(ess_ratio, rel=1e-4)
        assert stats["ess_lr_scale"].peek() == pytest.approx(expected_scale, rel=1e-4)
        assert stats["effective_lr"].peek() == pytest.approx(1e-3 * expected_scale, rel=1e-4)
        assert stats["is_weight_max"].peek() == pytest.approx(weights.max(), rel=1e-4)


def test_scaled_step_equals_a_plain_step_with_the_scaled_lr(episodes):
    shifts = np.linspace(-1.0, 1.0, len(episodes))
    weights = np.exp(shifts)
    scale = np.sqrt(weights.sum() ** 2 / (weights ** 2).sum() / len(weights))
    shifted = with_behaviour_shift(episodes, shifts)
    scaled = build(ess_lr_rule="sqrt", baseline="grpo")
    plain = build(ess_lr_rule="none", baseline="grpo", lr=1e-3 * scale)
    scaled.update(episodes=shifted)
    plain.update(episodes=shifted)
    a, b = module_params(scaled), module_params(plain)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    # ... and the base lr is restored afterwards.
    optimizer = scaled.get_optimizer(DEFAULT_MODULE_ID)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_opob_ghost_and_loop_routes_take_the_same_exact_step(episodes):
    shifts = np.linspace(-0.5, 0.5, len(episodes))  # off-policy: OPOB != GRPO baseline
    shifted = with_behaviour_shift(episodes, shifts)
    r_ghost, g_ghost = update_and_capture_gradients(build(opob_grad_norms="ghost"), shifted)
    r_loop, g_loop = update_and_capture_gradients(build(opob_grad_norms="loop"), shifted)
    assert r_ghost[DEFAULT_MODULE_ID]["total_loss"].peek() == pytest.approx(
        r_loop[DEFAULT_MODULE_ID]["total_loss"].peek(), rel=1e-4)
    assert r_ghost[DEFAULT_MODULE_ID]["trajectory_grad_norm_mean"].peek() == pytest.approx(
        r_loop[DEFAULT_MODULE_ID]["trajectory_grad_norm_mean"].peek(), rel=1e-4)
    assert g_ghost.abs().max() > 0
    # float32: summation orders differ (absolute tolerance scaled to the gradient's size)
    assert torch.allclose(g_ghost, g_loop, rtol=1e-4, atol=1e-5 * float(g_loop.abs().max()))


def test_opob_gradient_matches_brute_force_per_sample_autograd(episodes):
    """The ghost route's gradient = -(1/N) sum_i A_i w~_i g_i with A from per-sample norms."""
    shifts = np.linspace(-0.5, 0.5, len(episodes))
    shifted = with_behaviour_shift(episodes, shifts)
    learner = build(opob_grad_norms="ghost", lr=1.0)
    module = learner.module[DEFAULT_MODULE_ID]
    model = copy.deepcopy(module.model)
    batch = lm_batch(shifted)
    mask = batch["response_mask"]
    scores = []
    for i in range(len(shifted)):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        model.zero_grad()
        (response_log_probs(model, row) * row["response_mask"]).sum().backward()
        scores.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
    scores = torch.stack(scores)
    with torch.no_grad():
        logp = response_log_probs(model, batch)
    log_ratio = losses.sequence_log_ratio(logp, batch[BEHAVIOUR_LOGP], mask)
    truncated = losses.truncate_weights(losses.sequence_is_weights(log_ratio), 8.0)
    advantages = losses.opob_advantages(batch["rewards"], truncated, (scores ** 2).sum(1),
                                        batch["group_id"])
    expected = -((advantages * truncated)[:, None] * scores).sum(0) / (len(shifted) * 5)
    _, got = update_and_capture_gradients(learner, shifted)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_staleness_is_measured_against_the_learner_version(episodes):
    learner = build(baseline="grpo")
    learner.update(episodes=episodes)  # learner now at version 1
    stale = copy.deepcopy(episodes)
    for episode in stale:
        episode.extra_model_outputs[WEIGHTS_SEQ_NO].set(np.int64(0), at_indices=0)
    results = learner.update(episodes=stale)
    stats = results[DEFAULT_MODULE_ID]
    assert stats["staleness_mean"].peek() == 1 and stats["staleness_max"].peek() == 1
    assert list(stats["staleness"].peek()) == [1] * len(stale)


def test_non_finite_step_is_skipped_and_counted(episodes):
    learner = build(baseline="grpo")
    algorithm_metrics = MetricsLogger(root=True)  # where the Algorithm keeps lifetime counts
    skipped = (LEARNER_RESULTS, ALL_MODULES, "num_skipped_nonfinite_steps")
    before = module_params(learner)
    broken = with_behaviour_shift(episodes, [float("nan")] + [0.0] * (len(episodes) - 1))
    algorithm_metrics.aggregate([learner.update(episodes=broken)], key=LEARNER_RESULTS)
    assert algorithm_metrics.peek(skipped) == 1
    after = module_params(learner)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # Training goes on.
    algorithm_metrics.aggregate([learner.update(episodes=episodes)], key=LEARNER_RESULTS)
    assert algorithm_metrics.peek(skipped) == 1
    assert any(not torch.equal(before[n], p) for n, p in module_params(learner).items())


def test_rlmodule_forward_matches_response_log_probs(episodes):
    learner = build(baseline="grpo")
    module = learner.module[DEFAULT_MODULE_ID]
    batch = lm_batch(episodes)
    with torch.no_grad():
        out = module.forward_train(batch)[RESPONSE_LOGP]
        direct = response_log_probs(module.model, batch)
    assert torch.equal(out, direct)


def test_two_learners_take_the_same_step_as_one(episodes, ray_session):
    """Groups stay whole on each learner, gradients and the ESS sums are all-reduced: two
    learners (gloo) compute the one-learner step on the same batch."""
    import ray

    from rllib_ext.algorithms.vcpo.vcpo_learner import group_shards

    def module_gradients(learner):  # (nested: Ray pickles it by value for the learner actors)
        """The gradient of the last step, as the optimiser received it (after the all-reduce)."""
        model = learner.module[DEFAULT_MODULE_ID].model
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    shifted = with_behaviour_shift(episodes, np.linspace(-0.5, 0.5, len(episodes)))
    one = build()
    want_stats = one.update(episodes=shifted)[DEFAULT_MODULE_ID]
    want = module_gradients(one)
    cfg = config().learners(num_learners=2, num_cpus_per_learner=1)
    runner = LLMEnvRunner(config=cfg, worker_index=0, num_workers=1)  # spaces only
    group = cfg.build_learner_group(
        spaces={DEFAULT_MODULE_ID: runner.get_spaces()[DEFAULT_MODULE_ID]})
    try:
        shards = group_shards(shifted, 2)
        assert {len(s) for s in shards} == {N * PROMPTS // 2}
        results = group.update(episodes_refs=[ray.put(shard) for shard in shards])
        gradients = [r.get() for r in group.foreach_learner(module_gradients)]
        with pytest.raises(ray.exceptions.RayTaskError, match="whole groups on one learner"):
            group.update(episodes_refs=[ray.put(shifted[::2]), ray.put(shifted[1::2])])
    finally:
        group.shutdown()
    assert want.abs().max() > 0
    for got in gradients:
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    for result in results:
        stats = result[DEFAULT_MODULE_ID]
        for key in ("ess_ratio", "ess_lr_scale", "trajectory_grad_norm_mean", "entropy",
                    "is_truncated_fraction", "total_loss", "staleness_mean"):
            assert stats[key].peek() == pytest.approx(want_stats[key].peek(), rel=1e-5,
                                                       abs=1e-9), key


@pytest.mark.parametrize(("setting", "message"), [
    (dict(learner_dtype="float16"), "learner_dtype must be one of"),
    (dict(learner_micro_batch_tokens=0), "learner_micro_batch_tokens must be"),
    (dict(opob_grad_norms="fast"), "opob_grad_norms must be one of"),
])
def test_bad_learner_settings_are_refused_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        config(**setting).validate()


def test_each_learner_trains_train_batch_size_per_learner_trajectories():
    """As everywhere in RLlib, the batch size is per learner: 2 learners train twice the
    trajectories per step (each its own whole groups), one learner the setting itself."""
    from types import SimpleNamespace

    from rllib_ext.algorithms.vcpo.vcpo import VCPO

    for learners, expected in ((0, 16), (1, 16), (2, 32)):
        cfg = config(train_batch_size_per_learner=16).learners(num_learners=learners)
        controller = VCPO._new_staleness_controller(SimpleNamespace(config=cfg))
        assert controller.train_batch_size == expected
