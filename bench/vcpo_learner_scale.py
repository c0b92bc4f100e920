"""VCPO learner step at real model sizes: plain GRPO vs the exact-OPOB routes, time and memory.

Runs on a bare machine with PyTorch and transformers only (no Ray, no vLLM, no network): the
models are randomly initialised from the configs written out below, the batches are random
tokens, and the step is the project's Ray-free learner core
(``rllib_ext.algorithms.vcpo.torch.step.VCPOStep``) plus AdamW, as in a training run.

Variants, all on the same batches (whole groups of 8 responses):

* ``GRPO``: no IS correction, group mean/std baseline, no ESS scaling (one forward, one
  ``loss.backward()`` per micro-batch) - the reference cost;
* ``OPOB ghost``: seq-TIS + ESS lr + OPOB, exact norms by the one-shot route (one forward with
  activation capture and one backward per micro-batch of whole groups);
* ``OPOB loop``: the same by the reference's route, one forward + backward per trajectory with
  two float32 accumulators per group;
* ``OPOB auto``: the learner's default choice.

Each variant runs at each micro-batch budget of the case (``learner_micro_batch_tokens``);
the table reports every budget whose peak memory fits ``--memory-budget-gib``, and the
headline ratio compares each variant at its own fastest such budget with GRPO at its own.
Rounds take turns (order reversed every other round); times are medians, ratios the median
over rounds of the ratio within a round (the shared machine's speed drifts between rounds).

* ``--device cpu`` (default): a ~30M-parameter Llama with a 32k vocabulary (tied embeddings,
  like the small Qwen2 models), short and long rows, one thread, CPU time of the process; peak
  memory of the step's tensors (``rllib_ext.utils.tensor_memory``, one extra step); and the
  behaviour/learner log-prob match at k = 0 (ESS) of bfloat16 vs float32 learners.
* ``--device cuda``: Qwen2-0.5B and Qwen2-1.5B shapes in bfloat16 autocast with float32
  master weights (``torch.cuda.max_memory_allocated``, wall time).
* ``--recipe-check`` (cuda): one step of the GPU recipe (Qwen2-1.5B shape, 64 x (2048 + 2048)
  tokens, OPOB, default micro-batching): does its peak memory fit 80 GiB?

    .venv/bin/python bench/vcpo_learner_scale.py [--device cpu|cuda] [--quick] [--recipe-check]

On a machine with only torch and transformers, from the repository root:
``PYTHONPATH=. python bench/vcpo_learner_scale.py --device cuda --recipe-check``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import time

import torch
from common import RESULTS, markdown_table, write_results
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rllib_ext.algorithms.vcpo import losses
from rllib_ext.algorithms.vcpo.torch.step import StepBatch, VCPOStep, VCPOStepSettings
from rllib_ext.llm.log_probs import pack_prompt_response, response_log_probs
from rllib_ext.llm.tiny import tiny_model_dir
from rllib_ext.utils.heap import keep_freed_heap
from rllib_ext.utils.tensor_memory import PeakTensorMemory

NAME = "vcpo_learner_scale"
GIB = 1 << 30
GROUP = 8

# Qwen2 configs as published (config.json of Qwen/Qwen2-0.5B and Qwen/Qwen2-1.5B).
MODELS = {
    "llama-30m": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
        tie_word_embeddings=True)),
    "qwen2-0.5b": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen2-1.5b": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # a tiny model of the Qwen2 architecture (q/k/v biases): smoke tests of the GPU cases
    "qwen2-tiny": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}

VARIANTS = {
    "GRPO": dict(correction="none", baseline="grpo", ess_lr_rule="none"),
    "OPOB ghost": dict(opob_grad_norms="ghost"),
    "OPOB loop": dict(opob_grad_norms="loop"),
    "OPOB auto": dict(opob_grad_norms="auto"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str
    rows: int
    prompt: tuple[int, int]  # tokens per row, (min, max)
    response: tuple[int, int]
    groups_per_micro_batch: tuple[int | None, ...] = (None,)  # None: the whole batch

    def budgets(self) -> list[int | None]:
        longest = self.prompt[1] + self.response[1]
        return [None if g is None else g * GROUP * longest for g in self.groups_per_micro_batch]


CPU_CASES = (
    Case("short rows", "llama-30m", 32, (16, 32), (16, 48)),
    Case("long rows", "llama-30m", 8, (32, 64), (128, 192)),
)
CPU_QUICK = (Case("short rows", "llama-30m", 8, (8, 16), (8, 24)),)
GPU_CASES = (
    Case("0.5B, 32 x ~734", "qwen2-0.5b", 32, (200, 300), (300, 700), (1, 2, None)),
    Case("0.5B, 8 x ~2100", "qwen2-0.5b", 8, (500, 700), (1200, 1800), (1, None)),
    Case("1.5B, 8 x ~1190", "qwen2-1.5b", 8, (300, 400), (700, 1000), (1, None)),
    Case("1.5B, 16 x ~1280", "qwen2-1.5b", 16, (300, 400), (800, 1100), (1, None)),
)
GPU_QUICK = (Case("0.5B, 16 x ~734", "qwen2-0.5b", 16, (200, 300), (300, 700), (1, None)),)
SMOKE = (Case("qwen2-tiny", "qwen2-tiny", 16, (8, 16), (8, 32), (1, None)),)
RECIPE = Case("1.5B recipe 64 x (2048 + 2048)", "qwen2-1.5b", 64, (2048, 2048), (2048, 2048))


def build_model(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        model = MODELS[name]().float()  # float32 master weights
    return model


def make_batch(model, case: Case, device: torch.device, seed: int = 0) -> StepBatch:
    """Random prompts and responses; behaviour log-probs = the model's own (k = 0) plus noise
    of std 0.02 per token, so the IS weights vary; binary rewards with spread in each group."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size

    def tokens(bounds):
        n = int(torch.randint(bounds[0], bounds[1] + 1, (), generator=g))
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    prompts = [tokens(case.prompt) for _ in range(case.rows)]
    responses = [tokens(case.response) for _ in range(case.rows)]
    lm = {k: v.to(device) for k, v in pack_prompt_response(prompts, responses, 0).items()}
    with torch.no_grad(), autocast_for(device):
        logp = torch.cat([response_log_probs(model, {k: v[i:i + 1] for k, v in lm.items()})
                          for i in range(case.rows)])
    noise = 0.02 * torch.randn(logp.shape, generator=g).to(device)
    behaviour = (logp + noise) * lm["response_mask"]
    rewards = (torch.rand(case.rows, generator=g) < 0.5).float()
    rewards[0::GROUP], rewards[1::GROUP] = 1.0, 0.0
    group_ids = torch.arange(case.rows) // GROUP
    return StepBatch(lm, behaviour, rewards.to(device), group_ids.to(device))


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)


class Runner:
    """One model and AdamW shared by every variant (the weights move by lr 1e-6 a step)."""

    def __init__(self, model, device: torch.device) -> None:
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)

    def step(self, step: VCPOStep, batch: StepBatch) -> None:
        outcome = step.compute_gradients(batch)
        if not outcome.skipped:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = 1e-6 * outcome.lr_scale
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, step: VCPOStep, batch: StepBatch) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            self.step(step, batch)
            torch.cuda.synchronize(self.device)
            return time.perf_counter() - start
        start = time.process_time()
        self.step(step, batch)
        return time.process_time() - start

    def peak_bytes(self, step: VCPOStep, batch: StepBatch) -> int:
        """Peak memory of one step: allocated CUDA memory (everything: weights, optimiser,
        activations), or on a CPU the step's tensors (activations, gradients, buffers)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(step, batch)
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        with PeakTensorMemory() as memory:
            self.step(step, batch)
        return memory.peak_bytes


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def measure(case: Case, device: torch.device, rounds: int, memory_budget: int) -> dict:
    model = build_model(case.model, device)
    batch = make_batch(model, case, device)
    runner = Runner(model, device)
    lengths = batch.lm["attention_mask"].sum(1)
    result = {"case": case.name, "model": case.model,
              "parameters": sum(p.numel() for p in model.parameters()),
              "rows": case.rows, "tokens_mean": float(lengths.float().mean()),
              "response_tokens": int(batch.lm["response_mask"].sum()), "runs": {}}
    configurations = {}
    for variant, settings in VARIANTS.items():
        for budget in case.budgets():
            step = VCPOStep(model, VCPOStepSettings(micro_batch_tokens=budget, **settings))
            try:
                runner.step(step, batch)  # warm-up
                peak = runner.peak_bytes(step, batch)
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                runner.optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                result["runs"][variant, budget] = {"peak_gib": math.inf, "seconds": math.inf}
                continue
            result["runs"][variant, budget] = {"peak_gib": peak / GIB, "seconds": []}
            if peak <= memory_budget:
                configurations[variant, budget] = step
            print(f"  {case.name} {variant} budget {budget}: peak {peak / GIB:.2f} GiB",
                  flush=True)
    order = list(configurations)
    for round_ in range(rounds):
        for key in order[::-1] if round_ % 2 else order:
            result["runs"][key]["seconds"].append(runner.timed(configurations[key], batch))
    per_round = {key: run["seconds"] for key, run in result["runs"].items()
                 if isinstance(run["seconds"], list)}
    for run in result["runs"].values():
        if isinstance(run["seconds"], list):
            run["seconds"] = statistics.median(run["seconds"]) if run["seconds"] else math.nan
    best = {}
    for variant in VARIANTS:
        fitting = {b: result["runs"][variant, b]["seconds"] for b in case.budgets()
                   if (variant, b) in configurations}
        if fitting:
            budget = min(fitting, key=fitting.get)
            best[variant] = (budget, fitting[budget])
    result["best"] = best
    if "GRPO" in best:  # median over rounds of the ratio within the round (robust to drift)
        grpo = per_round["GRPO", best["GRPO"][0]]
        for variant, (budget, _) in best.items():
            result[f"{variant} ratio"] = statistics.median(
                t / g for t, g in zip(per_round[variant, budget], grpo, strict=True))
    print({k: v for k, v in result.items() if k != "runs"}, flush=True)
    del model, runner, configurations
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def recipe_check(device: torch.device) -> dict:
    """One OPOB step of the GPU recipe's shape and batch; its peak memory vs 80 GiB."""
    model = build_model(RECIPE.model, device)
    batch = make_batch(model, RECIPE, device)
    runner = Runner(model, device)
    step = VCPOStep(model, VCPOStepSettings())
    runner.step(step, batch)
    peak = runner.peak_bytes(step, batch)
    seconds = runner.timed(step, batch)
    print(f"recipe step: {seconds:.1f} s, peak {peak / GIB:.1f} GiB, micro-batch budget "
          f"{step.micro_batch_tokens} tokens, route {step.opob_route}", flush=True)
    return {"recipe_peak_gib": round(peak / GIB, 1), "recipe_step_s": round(seconds, 2),
            "recipe_micro_batch_tokens": step.micro_batch_tokens,
            "recipe_fits_80_gib": peak <= 80 * GIB}


def ess_at_k0(device: torch.device, quick: bool) -> list[dict]:
    """Behaviour/learner log-prob match at k = 0: responses sampled from the float32 model;
    ESS of the sequence IS weights between a behaviour precision and a learner precision.
    "bf16 engine" = the model's weights cast to bfloat16 (as a bf16 vLLM engine holds them);
    "bf16 learner" = float32 master weights under bfloat16 autocast."""
    models = {"llama-30m (random init)": build_model("llama-30m", device)}
    if (tiny_model_dir() / "config.json").exists():  # the embedded model, when built here
        models["tiny (trained, 0.45M)"] = LlamaForCausalLM.from_pretrained(
            tiny_model_dir(), dtype=torch.float32).to(device)
    rows, lengths = (16, (32,)) if quick else (64, (32, 128))
    out = []
    for (name, model), length in itertools.product(models.items(), lengths):
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(4, model.config.vocab_size, (rows, 8), generator=g)
        with torch.no_grad():
            sequences = model.generate(prompts.to(device), do_sample=True, temperature=1.0,
                                       top_k=0, max_new_tokens=length, min_new_tokens=length,
                                       pad_token_id=0)
        responses = sequences[:, 8:].tolist()
        lm = {k: v.to(device) for k, v in pack_prompt_response(prompts.tolist(), responses,
                                                               0).items()}
        values = {kind: log_probs_in(kind, model, lm)
                  for kind in ("float32", "bf16 learner", "bf16 engine")}
        mask = lm["response_mask"]
        for behaviour, learner in (("float32", "bf16 learner"), ("bf16 engine", "float32"),
                                   ("bf16 engine", "bf16 learner"), ("float32", "float32")):
            log_ratio = losses.sequence_log_ratio(values[learner], values[behaviour], mask)
            weights = losses.sequence_is_weights(log_ratio)
            out.append({"model": name, "behaviour": behaviour, "learner": learner,
                        "tokens": length, "ess_ratio": float(losses.ess_ratio(weights)),
                        "log_ratio_std": float(log_ratio.std())})
            print(out[-1], flush=True)
    return out


def log_probs_in(precision: str, model, lm) -> torch.Tensor:
    """Response log-probs with float32 weights ("float32"), float32 master weights under bf16
    autocast ("bf16 learner"), or the weights cast to bf16 ("bf16 engine")."""
    with torch.no_grad():
        if precision == "float32":
            return response_log_probs(model, lm)
        if precision == "bf16 learner":
            with torch.autocast(lm["input_ids"].device.type, dtype=torch.bfloat16):
                return response_log_probs(model, lm)
        cast = type(model)(model.config).to(lm["input_ids"].device)
        cast.load_state_dict(model.state_dict())
        return response_log_probs(cast.to(torch.bfloat16), lm).float()


def write(rows: list[dict], ess: list[dict], recipe: dict, args) -> None:
    flat: dict = {"device": args.device,
                  "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  "goal_opob_over_grpo": 1.25 if args.device == "cuda" else 1.15}
    table_rows = []
    for row in rows:
        key = f"{row['model']}_{row['case']}".replace(" ", "_").replace(",", "")
        for variant, (_, seconds) in row["best"].items():
            flat[f"{key}_{variant.replace(' ', '_')}_s"] = round(seconds, 3)
            if f"{variant} ratio" in row:
                flat[f"{key}_{variant.replace(' ', '_')}_ratio"] = round(row[f"{variant} ratio"], 3)
        for (variant, budget), run in row["runs"].items():
            flat[f"{key}_{variant.replace(' ', '_')}_budget{budget}_peak_gib"] = round(
                run["peak_gib"], 3)
            table_rows.append([
                f"{row['case']} ({row['parameters'] / 1e6:.0f}M, {row['rows']} x "
                f"{row['tokens_mean']:.0f} tok)", variant,
                "whole batch" if budget is None else f"{budget}",
                f"{run['seconds']:.3f}" if math.isfinite(run["seconds"]) else "-",
                f"{run['peak_gib']:.2f}" if math.isfinite(run["peak_gib"]) else "OOM",
                f"{row[f'{variant} ratio']:.2f}x" if row["best"].get(variant, (0,))[0] == budget
                and f"{variant} ratio" in row else ""])
    for entry in ess:
        flat[f"ess_k0_{entry['model'].split()[0]}_{entry['tokens']}_tokens_{entry['behaviour']}"
             f"_vs_{entry['learner']}".replace(" ", "_")] = round(entry["ess_ratio"], 4)
    flat.update(recipe)
    memory = "peak allocated GPU memory (weights, AdamW, activations)" if args.device == "cuda" \
        else "peak memory of the step's tensors (activations, gradients, per-sample buffers; " \
             "weights and AdamW state excluded)"
    clock = "wall time (CUDA synchronised)" if args.device == "cuda" else \
        "CPU time of the process, 1 thread"
    table = markdown_table(["case", "variant", "micro-batch tokens", "step s (median)",
                            "peak GiB", "vs GRPO (each at its fastest budget)"], table_rows)
    notes = [f"Whole learner step (VCPOStep + grad clip + AdamW), {args.rounds} interleaved "
             f"rounds after a warm-up; {clock}; ratio = median over rounds of the ratio within the "
             "round; "
             f"memory: {memory}.",
             "Random-init models, random tokens, binary rewards, groups of 8, behaviour "
             "log-probs = the model's own + noise (std 0.02 per token).",
             f"goal: exact OPOB <= {flat['goal_opob_over_grpo']}x plain GRPO, each at its "
             "fastest micro-batching within the memory budget."]
    if args.device == "cpu":
        notes.append("The 2-core machine was shared with other jobs; CPU time of one thread "
                     "is what is compared.")
    if ess:
        notes.append("ESS at k = 0 (same weights, responses sampled from the float32 model): " +
                     "; ".join(f"{e['model']}, {e['tokens']} tokens, behaviour {e['behaviour']}"
                               f" / learner {e['learner']}: ESS/B {e['ess_ratio']:.4f} "
                               f"(std of the sequence log-ratio {e['log_ratio_std']:.3f})"
                               for e in ess))
    if recipe:
        notes.append(f"GPU recipe step (1.5B shape, 64 x (2048 + 2048)): peak "
                     f"{recipe['recipe_peak_gib']} GiB, {recipe['recipe_step_s']} s, fits 80 GiB: "
                     f"{recipe['recipe_fits_80_gib']}.")
    write_results(result_name(args), flat,
                  f"VCPO learner step at scale ({args.device})", table, notes, args.quick)
    plot(rows, args)


def plot(rows: list[dict], args) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the tables are written, the plot is skipped
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(VARIANTS)
    for j, variant in enumerate(VARIANTS):
        axis.bar([i + j * width for i in range(len(rows))],
                 [row["best"].get(variant, (None, math.nan))[1] for row in rows], width,
                 label=variant)
    axis.set_xticks([i + width * (len(VARIANTS) - 1) / 2 for i in range(len(rows))],
                    [row["case"] for row in rows], fontsize=8)
    axis.set_ylabel("step, s (fastest budget)")
    axis.set_title(f"VCPO learner step: GRPO vs exact OPOB ({args.device})")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{result_name(args)}.png", dpi=120)


def result_name(args) -> str:
    """vcpo_learner_scale (CPU), vcpo_learner_scale_cuda, or ..._smoke for the smoke cases."""
    if args.cases == "smoke":
        return f"{NAME}_smoke"
    return NAME if args.device == "cpu" else f"{NAME}_{args.device}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="one small case, 2 rounds")
    parser.add_argument("--recipe-check", action="store_true",
                        help="(cuda) also run one step of the 1.5B recipe's batch")
    parser.add_argument("--memory-budget-gib", type=float, default=80.0)
    parser.add_argument("--cases", choices=("default", "smoke"), default="default",
                        help="smoke: a tiny Qwen2-architecture model through the GPU cases' code")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.recipe_check and device.type != "cuda":
        parser.error("--recipe-check needs --device cuda (a 1.5B model's 64 x 4096-token step)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as a CPU learner with one CPU (learner_cpus)
        keep_freed_heap(512 << 20)  # as a CPU learner's process (learner_heap_keep_mb)
    args.rounds = 2 if args.quick else 7
    cases = SMOKE if args.cases == "smoke" else (
        (GPU_QUICK if args.quick else GPU_CASES) if device.type == "cuda"
        else (CPU_QUICK if args.quick else CPU_CASES))
    rows = [measure(case, device, args.rounds, int(args.memory_budget_gib * GIB))
            for case in cases]
    ess = ess_at_k0(device, args.quick) if args.cases == "default" and device.type == "cpu" \
        else []
    recipe = recipe_check(device) if args.recipe_check else {}
    write(rows, ess, recipe, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
