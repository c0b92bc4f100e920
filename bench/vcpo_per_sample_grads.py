"""Cost of exact per-trajectory gradient norms (OPOB) vs a plain GRPO forward + backward.

For each model/batch size, one optimiser step's gradient is computed by:

* ``plain``: GRPO's forward + ``loss.backward()`` (no per-trajectory norms) - the reference cost;
* ``auto`` / ``materialize`` / ``chunked`` / ``ghost``: ``PerSampleGradients`` (one forward,
  one input-gradient backward, per-sample weight gradients from hooks and from the chunked
  LM head's backward, then the weighted gradient with OPOB's coefficient form: a weight per
  trajectory times a value per (group, reward) class), by the route each name forces for the
  hooked layers (``auto``: the default per-parameter choice);
* ``loop``: the reference's exact route, one forward + backward per trajectory
  (``opob.loop_accumulate``, two accumulators per group).

Times are CPU time of this process (``time.process_time``), not wall time: on a machine shared
with other jobs, wall time mostly measures how long the process waited for a core. Methods run
interleaved, round after round, so the remaining noise (shared caches) hits all of them alike;
the table reports the minimum time and the median of per-round ratios to ``plain``. Every run
also checks that the norms of each route equal the loop's. The process keeps freed heap memory,
as a VCPO learner's does (``learner_heap_keep_mb``), so no method pays page faults for memory
another method freed.

    .venv/bin/python bench/vcpo_per_sample_grads.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
from common import RESULTS, markdown_table, write_results
from transformers import LlamaConfig, LlamaForCausalLM

from rllib_ext.algorithms.vcpo import losses
from rllib_ext.algorithms.vcpo.torch.opob import fixed_terms, loop_accumulate, opob_classes
from rllib_ext.algorithms.vcpo.torch.per_sample import PerSampleGradients
from rllib_ext.llm.log_probs import pack_prompt_response, response_log_probs
from rllib_ext.llm.tiny import TinyModelSpec
from rllib_ext.utils.heap import keep_freed_heap

NAME = "vcpo_per_sample_grads"
ROUTES = ("auto", "materialize", "chunked", "ghost")


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    batch: int
    prompt_tokens: tuple[int, int]  # (min, max) per row
    response_tokens: tuple[int, int]
    group_size: int = 8
    rounds_fraction: float = 1.0  # of the run's rounds (slow cases get fewer)


SPEC = TinyModelSpec()
CASES = (
    Case("embedded_tiny", "the embedded tiny model on its a+b task (what `make demo` trains)",
         vocab=100, hidden=SPEC.hidden_size, intermediate=SPEC.intermediate_size,
         layers=SPEC.num_layers, heads=SPEC.num_heads, head_dim=SPEC.head_dim, batch=128,
         prompt_tokens=(5, 7), response_tokens=(1, 6)),
    Case("test_llama_64x32", "the test's tiny Llama, 64 rows x 32 tokens",
         vocab=40, hidden=64, intermediate=96, layers=2, heads=2, head_dim=32, batch=64,
         prompt_tokens=(8, 16), response_tokens=(8, 16)),
    Case("wider_32x128", "a wider model with longer rows, 32 rows x 128 tokens",
         vocab=512, hidden=256, intermediate=688, layers=4, heads=4, head_dim=64, batch=32,
         prompt_tokens=(32, 64), response_tokens=(32, 64), rounds_fraction=0.4),
)


def build_case(case: Case, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
        num_hidden_layers=case.layers, num_attention_heads=case.heads,
        num_key_value_heads=case.heads, head_dim=case.head_dim, max_position_embeddings=256,
        pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float()
    g = torch.Generator().manual_seed(seed)

    def tokens(bounds):
        n = int(torch.randint(bounds[0], bounds[1] + 1, (), generator=g))
        return torch.randint(1, case.vocab, (n,), generator=g).tolist()

    prompts = [tokens(case.prompt_tokens) for _ in range(case.batch)]
    responses = [tokens(case.response_tokens) for _ in range(case.batch)]
    batch = pack_prompt_response(prompts, responses, pad_id=0)
    mask = batch["response_mask"]
    rewards = torch.randint(0, 2, (case.batch,), generator=g).float()
    groups = torch.arange(case.batch) // case.group_size
    weights = losses.truncate_weights(torch.rand(case.batch, generator=g) * 3, 8.0)
    return model, batch, mask, rewards, groups, weights


def run_case(case: Case, rounds: int, loop_rounds: int) -> dict:
    model, batch, mask, rewards, groups, weights = build_case(case)
    params = sum(p.numel() for p in model.parameters())
    normalizer = float(mask.numel())
    coefficients = torch.randn(case.batch) / normalizer
    routes = {name: PerSampleGradients(model, strategy=name) for name in ROUTES}
    norms = {}

    def plain():
        model.zero_grad(set_to_none=True)
        logp = response_log_probs(model, batch)
        losses.policy_gradient_loss(logp, mask, coefficients, normalizer).backward()

    classes = opob_classes(rewards, groups, weights, eps=1e-6)  # as OPOB's one-shot route
    class_values = torch.randn(classes.count) / normalizer

    def per_sample(name):
        def step():
            model.zero_grad(set_to_none=True)
            psg = routes[name]
            with psg.capture():
                logp = response_log_probs(model, batch, head_observer=psg)
            norms[name] = psg.backward(logp, mask, classes)
            psg.accumulate_grads(class_values=class_values)
        return step

    def loop():
        model.zero_grad(set_to_none=True)
        norms["loop"] = loop_accumulate(model, response_log_probs, batch, rewards, groups,
                                        fixed_terms(mask, weights), normalizer).grad_sq_norms

    methods = {"plain": plain, **{name: per_sample(name) for name in ROUTES}, "loop": loop}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up (allocations, lazy inits)
        fn()
    for r in range(rounds):
        for name, fn in methods.items():
            if name == "loop" and r >= loop_rounds:
                continue
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    model.zero_grad(set_to_none=True)

    lengths = batch["attention_mask"].sum(1).float()
    row = {"case": case.name, "description": case.description, "params": params,
           "batch": case.batch, "tokens_per_row_mean": float(lengths.mean()),
           "padded_length": batch["input_ids"].shape[1],
           "plan_auto": sorted(set(routes["auto"].last_plan.values()))}
    best_plain = min(times["plain"])
    for name, ts in times.items():
        paired = [t / p for t, p in zip(ts, times["plain"], strict=False)]
        row[f"{name}_ms"] = 1e3 * min(ts)
        row[f"{name}_ratio_min"] = min(ts) / best_plain
        row[f"{name}_ratio_median"] = statistics.median(paired)
    row["max_rel_norm_error"] = max(
        float(((norms[name] - norms["loop"]).abs() / norms["loop"]).max()) for name in ROUTES)
    return row


def write_results_and_plot(rows: list[dict], quick: bool) -> None:
    flat: dict[str, float | str] = {"torch_threads": torch.get_num_threads(),
                                    "load_average_at_end": round(os.getloadavg()[0], 1)}
    for row in rows:
        for route in (*ROUTES, "loop"):
            flat[f"{row['case']}_{route}_overhead_pct"] = round(
                100 * (row[f"{route}_ratio_min"] - 1), 1)
        flat[f"{row['case']}_plain_ms"] = round(row["plain_ms"], 2)
        flat[f"{row['case']}_max_rel_norm_error"] = row["max_rel_norm_error"]
    table = markdown_table(
        ["case", "params", "rows x mean tokens", "plain ms",
         *[f"{r} overhead" for r in (*ROUTES, "loop")], "max rel. norm error"],
        [[row["case"], f"{row['params'] / 1e6:.2f}M",
          f"{row['batch']} x {row['tokens_per_row_mean']:.0f}", f"{row['plain_ms']:.1f}",
          *[f"{100 * (row[f'{r}_ratio_min'] - 1):+.0f}% "
            f"({100 * (row[f'{r}_ratio_median'] - 1):+.0f}%)" for r in (*ROUTES, "loop")],
          f"{row['max_rel_norm_error']:.1e}"] for row in rows])
    notes = ["CPU time (process_time). Overhead = (min time of the method) / (min time of "
             "plain) - 1; in brackets the median of per-round ratios. `loop` = the reference's "
             "route (one backward per trajectory).",
             *[f"{row['case']}: {row['description']}; auto used "
               f"{', '.join(row['plan_auto'])}." for row in rows]]
    write_results(NAME, flat, "Exact per-trajectory gradient norms: cost vs plain GRPO "
                  "forward + backward", table, notes, quick)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(ROUTES)
    for j, route in enumerate(ROUTES):
        ax.bar([i + j * width for i in range(len(rows))],
               [100 * (row[f"{route}_ratio_min"] - 1) for row in rows], width, label=route)
    ax.axhline(10, color="grey", linestyle="--", linewidth=1, label="10% goal")
    ax.set_xticks([i + width * (len(ROUTES) - 1) / 2 for i in range(len(rows))],
                  [row["case"] for row in rows])
    ax.set_ylabel("time over plain fwd+bwd (%)")
    ax.set_title("Exact per-trajectory grad norms + weighted gradient")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 cases, fewer rounds (< 3 min)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: least disturbed by other processes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_heap(512 << 20)  # as a VCPO learner's process does (learner_heap_keep_mb)
    cases = CASES[:2] if args.quick else CASES
    rounds, loop_rounds = (10, 2) if args.quick else (30, 3)
    rows = []
    for case in cases:
        row = run_case(case, max(3, round(rounds * case.rounds_fraction)), loop_rounds)
        rows.append(row)
        print(f"{row['case']:18s} plain {row['plain_ms']:8.1f} ms  " + "  ".join(
            f"{r} {100 * (row[f'{r}_ratio_min'] - 1):+5.0f}%" for r in (*ROUTES, "loop"))
            + f"  norm err {row['max_rel_norm_error']:.1e}", flush=True)
    write_results_and_plot(rows, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
