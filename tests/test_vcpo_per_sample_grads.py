"""Per-trajectory score-function gradients on a tiny Llama: cheap route vs brute force.

Timings (overhead over a plain forward + backward) live in bench/vcpo_per_sample_grads.py.
"""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rllib_ext.algorithms.vcpo import losses
from rllib_ext.algorithms.vcpo.torch.opob import (
    fixed_terms,
    loop_accumulate,
    score_grad_sq_norms_loop,
)
from rllib_ext.algorithms.vcpo.torch.per_sample import PerSampleGradients, UnsupportedModuleError
from rllib_ext.algorithms.vcpo.torch.per_sample.factored import active_length

VOCAB, PAD = 40, 0


def tiny_llama(tie: bool, pad_token_id: int | None, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        tie_word_embeddings=tie, pad_token_id=pad_token_id, initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # norm weights start at 1: perturb them so their gradients matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def make_batch(prompts: list[list[int]], responses: list[list[int]]):
    """verl layout: [left pad | prompt | response | right pad]; response mask [B, T]."""
    size, p_len, t_len = len(prompts), max(map(len, prompts)), max(map(len, responses))
    input_ids = torch.full((size, p_len + t_len), PAD)
    attention = torch.zeros(size, p_len + t_len, dtype=torch.long)
    mask = torch.zeros(size, t_len)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, p_len - len(prompt) : p_len] = torch.tensor(prompt)
        input_ids[i, p_len : p_len + len(response)] = torch.tensor(response)
        attention[i, p_len - len(prompt) : p_len + len(response)] = 1
        mask[i, : len(response)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
        "response_ids": input_ids[:, p_len:],
    }
    return batch, mask


def forward_fn(model, batch, head_observer=None):
    """Per-token log-probs [B, T] of the response tokens (logits at p predict token p + 1)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    t_len = batch["response_ids"].shape[1]
    logits = out.logits[:, -t_len - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, batch["response_ids"][..., None]).squeeze(-1)


def ragged(size: int, seed: int, max_prompt: int = 6, max_response: int = 7, low: int = 0):
    g = torch.Generator().manual_seed(seed)

    def seq(n):
        return torch.randint(low, VOCAB, (int(n),), generator=g).tolist()

    p_lens = torch.randint(1, max_prompt + 1, (size,), generator=g)
    t_lens = torch.randint(1, max_response + 1, (size,), generator=g)
    return [seq(n) for n in p_lens], [seq(n) for n in t_lens]


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """float32 agreement, with the absolute tolerance scaled to the tensor's magnitude."""
    atol = 1e-5 * float(want.abs().max())
    assert torch.allclose(got, want, rtol=1e-4, atol=atol), (name, float((got - want).abs().max()))


CASES = [(True, PAD), (False, None)]  # tied + embedding padding_idx; untied, no padding_idx


@pytest.fixture(scope="module", params=CASES, ids=["tied", "untied"])
def setup(request):
    tie, pad_token_id = request.param
    model = tiny_llama(tie, pad_token_id)
    # token 0 (= padding_idx in the tied case) also occurs as a real token
    prompts, responses = ragged(6, seed=1)
    batch, mask = make_batch(prompts, responses)
    # ground truth: each trajectory alone, unpadded, one forward + backward
    truth = torch.cat([
        score_grad_sq_norms_loop(model, forward_fn, *make_batch([p], [r]))
        for p, r in zip(prompts, responses, strict=True)
    ])
    return model, batch, mask, truth


def test_loop_norms_on_the_padded_batch_match_unpadded_trajectories(setup):
    model, batch, mask, truth = setup
    assert torch.allclose(score_grad_sq_norms_loop(model, forward_fn, batch, mask), truth, rtol=1e-5)
    assert truth.min() > 0 and truth.max() / truth.min() > 1.5  # distinct, non-trivial norms


STRATEGIES = ["auto", "materialize", "chunked", "ghost"]


def make_psg(model, strategy):
    # a small scratch buffer makes "chunked" build a few samples at a time, with a remainder
    return PerSampleGradients(model, strategy=strategy, chunk_bytes=40_000)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_sample_norms_match_the_loop(setup, strategy):
    model, batch, mask, truth = setup
    psg = make_psg(model, strategy)
    logp, norms = psg.forward_backward(forward_fn, batch, mask)
    psg.release()
    assert torch.allclose(norms, truth, rtol=1e-5, atol=0)
    assert torch.allclose(logp, forward_fn(model, batch).detach(), atol=1e-6)
    assert psg.last_plan["model.norm.weight"] == "materialize"  # [B, d]: always stored
    if strategy != "auto":
        tied = model.config.tie_word_embeddings
        matrices = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
        matrices += [] if tied else ["lm_head.weight"]
        assert {psg.last_plan[name] for name in matrices} == {strategy}


def test_production_layout_and_forward(setup):
    """rllib_ext.llm's layout (right padding, lm_head on gathered response positions only)."""
    from rllib_ext.llm.log_probs import pack_prompt_response, response_log_probs

    model = setup[0]
    batch = pack_prompt_response(*ragged(5, seed=8, low=1), pad_id=PAD)
    mask = batch["response_mask"]
    truth = score_grad_sq_norms_loop(model, response_log_probs, batch, mask)
    for strategy in STRATEGIES:
        psg = make_psg(model, strategy)
        _, norms = psg.forward_backward(response_log_probs, batch, mask)
        psg.release()
        assert torch.allclose(norms, truth, rtol=1e-5, atol=0), strategy


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_production_layout_gradient_skips_zero_rows(setup, strategy):
    """The weighted sum leaves out rows whose output gradient is zero (the last position and
    right padding) and still equals autograd's gradient."""
    from rllib_ext.llm.log_probs import pack_prompt_response, response_log_probs

    model = setup[0]
    batch = pack_prompt_response(*ragged(5, seed=9, low=1), pad_id=PAD)
    mask = batch["response_mask"]
    coefficients = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3])
    model.zero_grad(set_to_none=True)
    losses.policy_gradient_loss(response_log_probs(model, batch), mask, coefficients, 1.0
                                ).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    psg = make_psg(model, strategy)
    for _ in range(2):  # the second step reuses (and scales in place) the first one's buffers
        psg.forward_backward(response_log_probs, batch, mask)
        rows = psg.last_weighted_rows
        model.zero_grad(set_to_none=True)
        psg.accumulate_grads(-coefficients)
        for name, p in model.named_parameters():
            assert_close(p.grad, want[name], name)
    q_name = "model.layers.0.self_attn.q_proj.weight"
    if psg.last_plan[q_name] == "ghost":
        # exactly the rows whose output gradient is nonzero, counted here by autograd (how
        # many there are depends on the attention kernel's arithmetic: position 0 sees one key,
        # so its q-gradient is 0 or a rounding residue)
        assert rows[q_name] == nonzero_output_gradient_rows(model, batch, mask)
        assert rows[q_name] < batch["input_ids"].numel()  # the zero rows were left out
    elif q_name in rows:
        assert rows[q_name] == batch["input_ids"].numel()
    model.zero_grad(set_to_none=True)


def nonzero_output_gradient_rows(model, batch, mask) -> int:
    """Rows (trajectory, position) of layer 0's q-projection output with a nonzero gradient
    of the score objective, from a plain autograd backward."""
    from rllib_ext.llm.log_probs import response_log_probs

    outputs = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: outputs.append(out))
    try:
        logp = response_log_probs(model, batch)
    finally:
        handle.remove()
    [grad] = torch.autograd.grad((logp * mask).sum(), outputs)
    return int((grad != 0).any(dim=-1).sum())


def test_active_length_trims_only_all_zero_trailing_positions():
    grad = torch.randn(3, 6, 4)
    grad[:, 4:] = 0
    grad[1, 3] = 0  # zero in one row only: kept
    assert active_length(grad, {}) == 4
    hints = {}
    assert active_length(grad, hints) == 4 and hints == {6: 4}
    assert active_length(torch.zeros(2, 6, 4), {6: 5}) == 5  # stale hint: exact, not minimal
    grad[0, 5, 2] = 1e-30  # tiny but nonzero
    assert active_length(grad, {6: 4}) == 6
    grad[0, 5, 2] = float("nan")  # NaN must reach the norms (the step is then skipped)
    assert active_length(grad, {}) == 6
    assert active_length(torch.zeros(2, 3, 4), {}) == 0


def test_bfloat16_model_norms_and_gradient():
    """Half-precision models: Gram matrices and the weighted sum in float32 (no in-place
    scaling of bf16 buffers), within bf16 rounding of autograd on the same model."""
    from rllib_ext.llm.log_probs import pack_prompt_response, response_log_probs

    model = tiny_llama(tie=False, pad_token_id=None).to(torch.bfloat16)
    batch = pack_prompt_response(*ragged(4, seed=10, low=1), pad_id=PAD)
    mask = batch["response_mask"]
    truth = score_grad_sq_norms_loop(model, response_log_probs, batch, mask)
    coefficients = torch.tensor([1.0, -0.5, 0.25, 2.0])
    model.zero_grad(set_to_none=True)
    losses.policy_gradient_loss(response_log_probs(model, batch), mask, coefficients, 1.0
                                ).backward()
    want = {n: p.grad.float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    psg = PerSampleGradients(model)
    _, norms = psg.forward_backward(response_log_probs, batch, mask)
    assert torch.allclose(norms, truth, rtol=3e-2)
    psg.accumulate_grads(-coefficients)
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.bfloat16
        scale = float(want[name].abs().max())
        assert (p.grad.float() - want[name]).abs().max() <= 3e-2 * scale, name
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("length", "budget", "route"),
    [(4, 1 << 30, "ghost"), (60, 1 << 30, "materialize"), (60, 0, "chunked")],
)
def test_auto_route_follows_the_cost_model(length, budget, route):
    """Short rows: L x L Gram matrices are cheapest; long rows: building G_i, kept if the
    memory budget allows, else built in chunks for the norm only."""
    model = tiny_llama(tie=False, pad_token_id=None)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (length // 2,), generator=g).tolist() for _ in range(4)]
    batch, mask = make_batch(prompts, [p[::-1] for p in prompts])
    psg = PerSampleGradients(model, materialize_budget_bytes=budget)
    psg.forward_backward(forward_fn, batch, mask)
    psg.release()
    assert psg.last_plan["model.layers.0.self_attn.q_proj.weight"] == route
    if length == 4:  # building [B, vocab, d] embedding gradients costs more than L x L Grams
        assert psg.last_plan["model.embed_tokens.weight"] == "ghost"


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_accumulated_gradient_matches_autograd(setup, strategy):
    model, batch, mask, _ = setup
    coefficients = torch.tensor([0.7, -1.3, 0.0, 2.1, -0.4, 1.0])
    normalizer = 5.0
    model.zero_grad(set_to_none=True)
    losses.policy_gradient_loss(forward_fn(model, batch), mask, coefficients, normalizer).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    psg = make_psg(model, strategy)
    psg.forward_backward(forward_fn, batch, mask)
    psg.accumulate_grads(-coefficients / normalizer)
    for name, p in model.named_parameters():
        assert_close(p.grad, want[name], name)
    # accumulate adds to .grad, like backward(), and the state is gone afterwards
    with pytest.raises(RuntimeError, match="call backward"):
        psg.accumulate_grads(coefficients)
    psg.forward_backward(forward_fn, batch, mask)
    psg.accumulate_grads(-coefficients / normalizer)
    for name, p in model.named_parameters():
        assert_close(p.grad, 2 * want[name], name)
    model.zero_grad(set_to_none=True)


def test_loop_accumulate_is_the_opob_gradient(setup):
    model, batch, mask, truth = setup
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    group_ids = torch.tensor([4, 4, 4, 9, 9, 2])  # a group with spread, one flat, one singleton
    weights = torch.tensor([0.5, 8.0, 1.2, 3.0, 0.1, 1.0])
    normalizer = 6.0
    model.zero_grad(set_to_none=True)
    result = loop_accumulate(model, forward_fn, batch, rewards, group_ids,
                             fixed_terms(mask, weights), normalizer)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.allclose(result.grad_sq_norms, truth, rtol=1e-5)
    advantages = losses.opob_advantages(rewards, weights, truth.float(), group_ids)
    assert torch.allclose(result.advantages, advantages, atol=1e-6)
    assert result.advantages[:3].abs().min() > 0 and (result.advantages[3:] == 0).all()
    # b* is not the plain mean when norms and weights differ
    assert abs(result.baselines[0].item() - 2 / 3) > 1e-3

    model.zero_grad(set_to_none=True)
    losses.policy_gradient_loss(
        forward_fn(model, batch), mask, advantages * weights, normalizer
    ).backward()
    for name, p in model.named_parameters():
        assert_close(got[name], p.grad, name)
    model.zero_grad(set_to_none=True)


class _ToyLM(nn.Module):
    """Biases, LayerNorm (bias), RMSNorm with a zero weight, a Linear called twice, and an
    embedding padding_idx: the paths a Llama does not take."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Embedding(VOCAB, 16, padding_idx=PAD)
        self.norm_in = nn.LayerNorm(16)
        self.block = nn.Linear(16, 16)
        self.norm_out = nn.RMSNorm(16)
        self.head = nn.Linear(16, VOCAB)
        self.unused = nn.Linear(16, 2)  # runs, but its output never reaches logp
        with torch.no_grad():
            for p in (self.norm_in.weight, self.norm_in.bias, self.norm_out.weight):
                p.add_(0.3 * torch.randn_like(p))
            self.norm_out.weight[3] = 0.0  # forces the recomputing path for h(x)

    def forward(self, ids):
        h = self.norm_in(self.embed(ids))
        self.unused(h)
        for _ in range(2):  # one parameter, two per-sample pieces
            h = h + torch.tanh(self.block(h))
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[None, :, None]
        h = h.cumsum(1) / steps  # positions interact (causally), rows do not
        return self.head(self.norm_out(h))


def toy_forward_fn(model, batch, head_observer=None):
    t_len = batch["targets"].shape[1]
    logits = model(batch["ids"])[:, -t_len - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, batch["targets"][..., None]).squeeze(-1)


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_biases_layernorm_reused_modules_on_a_toy_lm(strategy):
    model = _ToyLM()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, VOCAB, (5, 9), generator=g)
    lengths = torch.tensor([4, 1, 3, 4, 2])
    mask = (torch.arange(4)[None, :] < lengths[:, None]).float()
    ids[:, -4:][mask == 0] = PAD  # right padding of the responses
    ids[0, :3] = PAD  # left padding; without an attention mask it reaches later positions
    batch = {"ids": ids, "targets": ids[:, -4:]}
    truth = score_grad_sq_norms_loop(model, toy_forward_fn, batch, mask)
    psg = make_psg(model, strategy)
    _, norms = psg.forward_backward(toy_forward_fn, batch, mask)
    assert torch.allclose(norms, truth, rtol=1e-5, atol=0)
    assert psg.last_plan["block.bias"] == psg.last_plan["norm_in.bias"] == "materialize"

    coefficients = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.2])
    psg.accumulate_grads(coefficients)
    got = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    losses.policy_gradient_loss(toy_forward_fn(model, batch), mask, -coefficients, 1.0).backward()
    assert got["unused.weight"] is None and model.unused.weight.grad is None  # as autograd
    for name, p in model.named_parameters():
        if not name.startswith("unused"):
            assert_close(got[name], p.grad, name)
    assert got["embed.weight"][PAD].abs().max() == 0  # padding_idx row: no gradient


class _GemmaStyleNorm(nn.Module):
    """y = (1 + weight) * x: not of the form weight * h(x), so it must be rejected."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return (1 + self.weight) * x


class _FlattensBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        h = self.embed(ids).reshape(-1, 8)  # [B*L, d]: batch is no longer dim 0
        return torch.log_softmax(self.head(h), -1).reshape(*ids.shape, VOCAB).amax(-1)


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)

    def forward(self, ids):
        h = self.embed(ids)
        h.mul_(2.0)
        return h.sum(-1)


def test_unsupported_and_invalid_models_raise_clear_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    with pytest.raises(UnsupportedModuleError, match=r"module '1' of type Conv1d"):
        PerSampleGradients(model)
    with pytest.raises(UnsupportedModuleError, match=r"'norm' of type _GemmaStyleNorm"):
        PerSampleGradients(nn.ModuleDict({"lin": nn.Linear(4, 4), "norm": _GemmaStyleNorm(4)}))
    model[1].requires_grad_(False)  # frozen unsupported modules are fine
    PerSampleGradients(model)
    with pytest.raises(UnsupportedModuleError, match="max_norm"):
        PerSampleGradients(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(ValueError, match="strategy must be one of"):
        PerSampleGradients(nn.Linear(2, 2), strategy="fast")

    ids = torch.randint(0, VOCAB, (3, 5))
    psg = PerSampleGradients(_FlattensBatch())
    with psg.capture():
        logp = psg.model(ids)
    with pytest.raises(ValueError, match=r"module 'head'.*batch as dim 0"):
        psg.backward(logp, torch.ones(3, 5))

    psg = PerSampleGradients(_InPlace())
    with psg.capture():
        logp = psg.model(ids)
    with pytest.raises(RuntimeError, match="modified in place"):
        psg.backward(logp, torch.ones(3, 5))
    with pytest.raises(RuntimeError, match="nothing captured"):
        psg.backward(logp, torch.ones(3, 5))
