"""The Ray-free VCPO learner core: chunked log-probs, micro-batched exact gradients for every
correction x baseline, the head's memory, mixed precision. Torch and transformers only."""

import itertools
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rllib_ext.algorithms.vcpo import losses
from rllib_ext.algorithms.vcpo.torch.micro_batches import plan_micro_batches
from rllib_ext.algorithms.vcpo.torch.opob import score_grad_sq_norms_loop
from rllib_ext.algorithms.vcpo.torch.per_sample import PerSampleGradients, RowClasses
from rllib_ext.algorithms.vcpo.torch.per_sample import head as head_module
from rllib_ext.algorithms.vcpo.torch.step import (
    BASELINES,
    CORRECTIONS,
    StepBatch,
    VCPOStep,
    VCPOStepSettings,
)
from rllib_ext.llm.log_probs import chunk_bounds, pack_prompt_response, response_log_probs
from rllib_ext.utils.tensor_memory import PeakTensorMemory

VOCAB, GROUP = 48, 4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def llama(tie: bool = False, vocab: int = VOCAB, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=hidden // 2, max_position_embeddings=256,
                         tie_word_embeddings=tie, initializer_range=0.2)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # norm weights start at 1: perturb them so their gradients matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def reference_log_probs(model, batch, temperature=1.0):
    """The former implementation: float32 logits of every response position, padding included."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    index = batch["response_index"]
    source = (index - 1).clamp(min=0)
    gathered = hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.get_output_embeddings()(gathered).float() / temperature
    targets = batch["input_ids"].gather(1, index)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    return logp * batch["response_mask"], entropy * batch["response_mask"]


def ragged_batch(groups: int, seed: int, max_prompt: int = 6, max_response: int = 9):
    g = torch.Generator().manual_seed(seed)
    size = groups * GROUP

    def seq(n):
        return torch.randint(1, VOCAB, (int(n),), generator=g).tolist()

    prompts = [seq(n) for n in torch.randint(1, max_prompt + 1, (size,), generator=g)]
    responses = [seq(n) for n in torch.randint(1, max_response + 1, (size,), generator=g)]
    return pack_prompt_response(prompts, responses, pad_id=0)


def step_batch(model, groups: int = 4, seed: int = 1) -> StepBatch:
    """Behaviour log-probs = the model's own, shifted per trajectory (IS weights from e^-1.5 to
    e^2.5, some above c = 8), rewards with spread in every group but the last."""
    lm = ragged_batch(groups, seed)
    size = lm["input_ids"].shape[0]
    with torch.no_grad():
        logp = response_log_probs(model, lm)
    shifts = torch.linspace(-1.5, 2.5, size)
    first = torch.zeros_like(logp)
    first[:, 0] = shifts
    behaviour = (logp - first) * lm["response_mask"]
    g = torch.Generator().manual_seed(seed + 1)
    rewards = torch.randint(0, 2, (size,), generator=g).float()
    rewards[:GROUP] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    rewards[-GROUP:] = 1.0  # a flat group: no signal
    group_ids = torch.arange(size) // GROUP * 7 + 3  # arbitrary ids
    return StepBatch(lm, behaviour, rewards, group_ids, versions=torch.arange(size) % 3)


def gradient_of(model, settings: VCPOStepSettings, batch: StepBatch):
    outcome = VCPOStep(model, settings).compute_gradients(batch, learner_version=4)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return outcome, grads


# ------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [1, 4, None], ids=["chunk1", "chunk4", "one_chunk"])
def test_chunked_log_probs_equal_full_logits(tie, chunk):
    model = llama(tie)
    batch = ragged_batch(3, seed=2)
    weights = torch.rand(batch["response_mask"].shape, generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.7):
        want, want_entropy = reference_log_probs(model, batch, temperature)
        (want * weights).sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        got, entropy = response_log_probs(model, batch, temperature, chunk_tokens=chunk,
                                          return_entropy=True)
        (got * weights).sum().backward()
        assert torch.allclose(got, want, atol=2e-6), float((got - want).abs().max())
        assert torch.allclose(entropy, want_entropy, atol=2e-6)
        assert not entropy.requires_grad
        for name, p in model.named_parameters():
            scale = float(expected[name].abs().max())
            assert (p.grad - expected[name]).abs().max() <= 1e-5 * scale, name
        model.zero_grad(set_to_none=True)


def test_chunks_hold_whole_rows_or_pieces_of_one_row():
    assert chunk_bounds((3, 1, 7, 2, 2), 4) == ((0, 4), (4, 8), (8, 11), (11, 15))
    assert chunk_bounds((0, 2, 0, 2), 3) == ((0, 2), (2, 4))
    assert chunk_bounds((5,), 5) == ((0, 5),)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_bounds((1,), 0)


def test_head_memory_grows_with_the_chunk_not_with_the_batch():
    """32k vocabulary: the peak memory of forward + backward grows with the chunk of tokens,
    not with the number of response tokens (the full-logits implementation grows with B x R)."""
    vocab, mib = 32000, 1 << 20
    model = llama(vocab=vocab, hidden=16)
    g = torch.Generator().manual_seed(0)

    def batch(rows, length):
        def seq(n):
            return torch.randint(1, vocab, (n,), generator=g).tolist()
        return pack_prompt_response([seq(3) for _ in range(rows)],
                                    [seq(length) for _ in range(rows)], pad_id=0)

    def peak(fn, data):
        model.zero_grad(set_to_none=True)
        with PeakTensorMemory() as counter:
            fn(model, data).sum().backward()
        return counter.peak_bytes / mib

    small, large = batch(4, 16), batch(16, 64)  # 64 vs 1024 response tokens
    chunked = {(name, c): peak(lambda m, d, c=c: response_log_probs(m, d, chunk_tokens=c), data)
               for (name, data), c in itertools.product((("small", small), ("large", large)),
                                                        (16, 64))}
    full_small = peak(lambda m, d: reference_log_probs(m, d)[0], small)
    full_large = peak(lambda m, d: reference_log_probs(m, d)[0], large)
    logits_mib = 4 * vocab / mib  # one float32 row of logits
    # full logits: +960 rows of logits (several copies of each)
    assert full_large - full_small > 2 * 960 * logits_mib
    # chunked: 16x the tokens cost less than 50 rows of logits more
    assert chunked["large", 16] - chunked["small", 16] < 50 * logits_mib
    # ... and a 4x larger chunk costs at least 2 x 48 more rows (the chunk's logits, twice)
    assert chunked["large", 64] - chunked["large", 16] > 2 * 48 * logits_mib


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("chunk", "padded_bytes"), [(3, 1 << 20), (100, 1 << 20), (100, 0)],
                         ids=["rows_split", "whole_rows_padded", "whole_rows_one_by_one"])
def test_chunked_head_per_sample_norms_and_gradient(tie, chunk, padded_bytes, monkeypatch):
    """The head's per-sample pieces from its own backward: Gram norms for short rows (padded
    to a batch, or row by row), rows built in a [V, d] buffer when that is cheaper or split
    over chunks; with a tied embedding the cross term; per-class sums. Norms against the
    per-row loop, gradients against autograd."""
    monkeypatch.setattr(head_module, "PADDED_COPY_BYTES", padded_bytes)
    model = llama(tie, hidden=8)
    lm = ragged_batch(2, seed=4, max_response=14)
    mask = lm["response_mask"]
    assert mask.sum(1).max() > 8 and mask.sum(1).min() <= 8

    def forward(m, batch, head_observer=None):
        return response_log_probs(m, batch, 0.8, chunk_tokens=chunk, head_observer=head_observer)

    truth = score_grad_sq_norms_loop(model, forward, lm, mask)
    coefficients = torch.linspace(-1.0, 1.5, mask.shape[0])
    losses.policy_gradient_loss(forward(model, lm), mask, coefficients, 1.0).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    psg = PerSampleGradients(model)
    _, norms = psg.forward_backward(forward, lm, mask)
    assert torch.allclose(norms, truth, rtol=1e-5, atol=0)
    psg.accumulate_grads(-coefficients)
    for name, p in model.named_parameters():
        assert (p.grad - want[name]).abs().max() <= 1e-5 * want[name].abs().max(), name
    model.zero_grad(set_to_none=True)
    # coefficients of the promised form scale_i * value[class_i]: the head sums per class in
    # its backward instead of recomputing
    scale = torch.linspace(0.5, 2.0, mask.shape[0])
    values = torch.tensor([-0.7, 1.3, 0.4])
    classes = RowClasses.of(scale, [0, 1, -1, 0, 2, 1, 2, 0])
    losses.policy_gradient_loss(forward(model, lm), mask, -classes.coefficients(values), 1.0
                                ).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with psg.capture():
        logp = forward(model, lm, head_observer=psg)
    psg.backward(logp, mask, classes)
    psg.accumulate_grads(class_values=values)
    for name, p in model.named_parameters():
        assert (p.grad - want[name]).abs().max() <= 1e-5 * want[name].abs().max(), name
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------- micro-batches


def test_micro_batch_plan():
    lengths = [5, 9, 3, 4, 10, 2, 2, 2]
    groups = [1, 1, 2, 2, 3, 3, 4, 4]
    plain = plan_micro_batches(lengths, groups, 20, None)
    assert [m.rows for m in plain] == [(0, 1), (2, 3), (4, 5), (6, 7)]  # 18, 8, 20, 4 tokens
    assert all(m.tokens <= 20 and m.route == "plain" for m in plain)
    one_shot = plan_micro_batches(lengths, groups, 12, "one_shot")
    assert [(m.rows, m.route) for m in one_shot] == [
        ((2, 3), "one_shot"), ((6, 7), "one_shot"), ((0, 1), "loop"), ((4, 5), "loop")]
    assert [m.route for m in plan_micro_batches(lengths, groups, None, "one_shot")] == \
        ["one_shot"]
    assert {m.route for m in plan_micro_batches(lengths, groups, None, "loop")} == {"loop"}


CASES = list(itertools.product(CORRECTIONS, BASELINES))


@pytest.mark.parametrize(("correction", "baseline"), CASES,
                         ids=[f"{c}-{b}" for c, b in CASES])
def test_micro_batched_gradient_equals_the_one_shot_gradient(correction, baseline):
    model = llama()
    batch = step_batch(model)
    settings = VCPOStepSettings(correction=correction, baseline=baseline,
                                micro_batch_tokens=None, dtype="float32")
    one_shot, want = gradient_of(model, settings, batch)
    assert want.abs().max() > 0
    longest = int(batch.lm["attention_mask"].sum(1).max())
    # budget: about two groups per micro-batch; OPOB groups that do not fit take the loop
    for tokens in (2 * GROUP * longest, GROUP * longest - 1, 1):
        step = VCPOStep(model, VCPOStepSettings(correction=correction, baseline=baseline,
                                                micro_batch_tokens=tokens, dtype="float32"))
        outcome = step.compute_gradients(batch, learner_version=4)
        got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        assert sum(outcome.routes.values()) > 1
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), tokens
        assert outcome.loss == pytest.approx(one_shot.loss, rel=1e-5, abs=1e-9)
        for key, value in one_shot.metrics.items():
            assert outcome.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_opob_routes_agree_and_match_brute_force():
    """ghost (one-shot per-sample), loop and auto give the OPOB gradient of a per-row autograd
    computation: -(1/(B R)) sum_i A_i w~_i g_i, A from the exact norms."""
    model = llama(tie=True)
    batch = step_batch(model, seed=5)
    lm, mask = batch.lm, batch.lm["response_mask"]
    scores = []
    for i in range(len(batch.rewards)):
        row = {k: v[i : i + 1] for k, v in lm.items()}
        model.zero_grad(set_to_none=True)
        (response_log_probs(model, row) * row["response_mask"]).sum().backward()
        scores.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    scores = torch.stack(scores)
    with torch.no_grad():
        logp = response_log_probs(model, lm)
    weights = losses.truncate_weights(losses.sequence_is_weights(
        losses.sequence_log_ratio(logp, batch.behaviour_logp, mask)), 8.0)
    advantages = losses.opob_advantages(batch.rewards, weights, (scores ** 2).sum(1),
                                        batch.group_ids)
    want = -((advantages * weights)[:, None] * scores).sum(0) / mask.numel()
    for route in ("ghost", "loop", "auto"):
        outcome, got = gradient_of(model, VCPOStepSettings(opob_grad_norms=route,
                                                           dtype="float32"), batch)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), route
        assert outcome.metrics["trajectory_grad_norm_mean"] == pytest.approx(
            float(scores.norm(dim=1).mean()), rel=1e-5)


def test_gradient_checkpointing_takes_the_loop_route_and_says_so(caplog):
    model = llama()
    batch = step_batch(model)
    _, want = gradient_of(model, VCPOStepSettings(dtype="float32"), batch)
    model.gradient_checkpointing_enable()
    model.train()  # (transformers checkpoints in training mode only)
    with caplog.at_level(logging.INFO, logger="rllib_ext.algorithms.vcpo.torch.step"):
        step = VCPOStep(model, VCPOStepSettings(dtype="float32"))
        outcomes = [step.compute_gradients(batch) for _ in range(2)]
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    assert step.opob_route == "loop" and all(o.routes["loop"] > 0 for o in outcomes)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    notes = [r for r in caplog.records if r.name == "rllib_ext.algorithms.vcpo.torch.step"]
    assert len(notes) == 1 and "loop route" in notes[0].getMessage()
    with pytest.raises(ValueError, match="opob_grad_norms='ghost' cannot run with gradient"):
        VCPOStep(model, VCPOStepSettings(opob_grad_norms="ghost"))


def test_step_metrics_against_hand_computation():
    model = llama()
    batch = step_batch(model)
    outcome, _ = gradient_of(model, VCPOStepSettings(baseline="grpo", dtype="float32"), batch)
    with torch.no_grad():
        logp, entropy = reference_log_probs(model, batch.lm)
    mask = batch.lm["response_mask"]
    w = losses.sequence_is_weights(losses.sequence_log_ratio(logp, batch.behaviour_logp, mask))
    ess = float(w.sum() ** 2 / (w ** 2).sum() / len(w))
    metrics = outcome.metrics
    assert metrics["ess_ratio"] == pytest.approx(ess, rel=1e-5)
    assert metrics["ess_lr_scale"] == pytest.approx(math.sqrt(ess), rel=1e-5)
    assert metrics["is_truncated_fraction"] == pytest.approx(float((w > 8.0).float().mean()))
    assert 0 < metrics["is_truncated_fraction"] < 1
    assert metrics["entropy"] == pytest.approx(float(entropy.sum() / mask.sum()), rel=1e-5)
    assert metrics["is_weight_max"] == pytest.approx(float(w.max()), rel=1e-5)
    assert metrics["staleness_max"] == 4 and outcome.staleness[:3] == [4, 3, 2]


def test_non_finite_log_probs_skip_the_step_on_every_route():
    model = llama()
    batch = step_batch(model)
    batch.behaviour_logp[5, 0] = float("nan")
    for route in ("ghost", "loop"):
        outcome = VCPOStep(model, VCPOStepSettings(opob_grad_norms=route, micro_batch_tokens=1,
                                                   dtype="float32")).compute_gradients(batch)
        assert outcome.skipped and outcome.metrics == {}
        assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------- bf16


def test_bfloat16_autocast_norms_and_gradient_within_bf16_rounding():
    """float32 master weights under bf16 autocast: per-sample norms within bf16 rounding of the
    float32 autograd reference; the weighted gradient as close to float32 as autograd's own
    bf16 gradient is. (Not also "within 3% of autograd's bf16 gradient": the two round
    differently, and on an AMD EPYC each is ~3% of the scale from float32, so they can be
    further apart than that from each other.)"""
    model = llama(tie=True)
    lm = ragged_batch(2, seed=3)
    mask = lm["response_mask"]
    truth = score_grad_sq_norms_loop(model, response_log_probs, lm, mask)
    coefficients = torch.linspace(-1.0, 1.5, mask.shape[0])

    def autograd_gradient(dtype):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logp = response_log_probs(model, lm)
        losses.policy_gradient_loss(logp, mask, coefficients, 1.0).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want, bf16 = autograd_gradient(torch.float32), autograd_gradient(torch.bfloat16)
    model.zero_grad(set_to_none=True)
    psg = PerSampleGradients(model)
    with psg.capture(), torch.autocast("cpu", dtype=torch.bfloat16):
        logp = response_log_probs(model, lm, head_observer=psg)
    norms = psg.backward(logp, mask)
    relative = ((norms - truth).abs() / truth).max()
    assert 1e-6 < relative < 3e-2  # bf16 was used, and its rounding is all that differs
    psg.accumulate_grads(-coefficients)
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        scale = float(want[name].abs().max())
        autograd_error = float((bf16[name] - want[name]).abs().max())
        assert (p.grad - want[name]).abs().max() <= 1.5 * autograd_error + 1e-3 * scale, name
    model.zero_grad(set_to_none=True)


def test_learner_dtype_auto_is_float32_on_a_cpu_and_bf16_step_is_close():
    model = llama()
    batch = step_batch(model)
    assert VCPOStep(model, VCPOStepSettings()).dtype == torch.float32
    _, want = gradient_of(model, VCPOStepSettings(dtype="float32"), batch)
    _, got = gradient_of(model, VCPOStepSettings(dtype="bfloat16"), batch)
    assert 0 < (got - want).abs().max() <= 5e-2 * want.abs().max()


# ------------------------------------------------------------------------------- Ray-free


@pytest.mark.parametrize("module", ["rllib_ext.algorithms.vcpo.torch.step",
                                    "rllib_ext.llm.log_probs", "vcpo_learner_scale"])
def test_the_learner_core_and_its_bench_import_nothing_from_ray_or_vllm(module):
    code = (f"import sys; sys.path.insert(0, 'bench'); import {module}; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
