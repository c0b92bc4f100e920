"""Generation backends behind one interface: vLLM (the real engine) and transformers.generate.

Both return, per prompt, ``n`` completions with their token ids, the per-token log-probs of the
sampling distribution that produced them (temperature and top-p applied, i.e. the behaviour
policy the learner corrects for) and why generation stopped. The transformers backend is the
fallback for machines without vLLM and the reference the tests compare vLLM against.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from rllib_ext.llm.weight_sync import BucketAssembler, WeightBucket, WeightSyncError


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. ``temperature=0`` means greedy; ``min_tokens`` suppresses
    the end-of-sequence token until that many tokens exist (fixed-length benchmarks); ``seed``
    makes the draws of one call reproducible (None: the engine's own random state)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 8
    min_tokens: int = 0
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"num_generations (n) must be an integer >= 1, got {self.n!r}")
        if not 0 <= self.temperature:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_response_tokens must be an integer >= 1, got "
                            f"{self.max_tokens!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            problems.append(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if problems:
            raise ValueError("; ".join(problems) + ". Fix: correct the rollout settings.")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each token in token_ids
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (hit max_tokens)


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings
                 ) -> list[list[Completion]]: ...

    dtype: torch.dtype  # of the engine's weights: what a weight sync sends

    def load_weight_buckets(self, buckets: Iterable[WeightBucket], *, version: int,
                            count: int) -> dict:
        """Load one update (``count`` buckets) in place; raise WeightSyncError unless it
        arrived whole. Returns what arrived (buckets, largest bucket in bytes)."""
        ...

    def close(self) -> None: ...


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one tensor; returns (input_ids, attention_mask)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, length - len(seq):] = 1
    return input_ids, attention_mask


class TransformersBackend:
    """``model.generate`` on the learner-format model (CPU or one GPU)."""

    def __init__(self, model_path: str, *, device: str = "cpu", seed: int | None = None,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        self.model.eval()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.device = device
        self.generator_seed = seed

    @torch.no_grad()
    def generate(self, prompts, sampling):
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        elif self.generator_seed is not None:
            torch.manual_seed(self.generator_seed)
            self.generator_seed += 1
        repeated = [p for p in prompts for _ in range(sampling.n)]
        input_ids, attention_mask = left_pad(repeated, self.pad_id)
        greedy = sampling.temperature == 0
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            max_new_tokens=sampling.max_tokens, min_new_tokens=sampling.min_tokens or None,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None,
            output_scores=True, return_dict_in_generate=True,
            pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        new_tokens = out.sequences[:, input_ids.shape[1]:].cpu()
        # `scores` are the processed logits the tokens were sampled from.
        logprobs = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1).cpu()
        token_logprobs = logprobs.gather(-1, new_tokens[..., None])[..., 0]
        completions = []
        for row in range(len(repeated)):
            ids = new_tokens[row].tolist()
            stop = ids.index(self.eos_id) + 1 if self.eos_id in ids else None
            ids = ids[:stop] if stop else ids
            completions.append(Completion(ids, token_logprobs[row, :len(ids)].tolist(),
                                          "stop" if stop else "length"))
        return [completions[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def load_weight_buckets(self, buckets, *, version, count):
        assembler = BucketAssembler(version, count)
        state_dict = {}
        for bucket in buckets:
            state_dict.update((name, tensor.clone()) for name, tensor in assembler.add(bucket))
        assembler.finish()
        self.model.load_state_dict(state_dict)
        return {"buckets_received": count, "max_bucket_bytes": assembler.max_bucket_bytes}

    def close(self):
        self.model = None


class VLLMBackend:
    """A ``vllm.LLM`` engine.

    ``in_process=True`` keeps the engine in the calling process: start-up in seconds, weight
    syncs without serialisation and no inter-process traffic: on a 2-core CPU 1.4-1.8x the
    tokens/s of the separate layout (bench/results/rollout_throughput.md); vLLM's CPU worker then
    pins the process's OpenMP threads, so keep learners out of that process (env runners are
    actors). ``in_process=False`` is vLLM's default layout (engine core and worker in processes
    of their own), which overlaps scheduling with the device's work: the choice for GPUs.
    ``"auto"``: in-process on CPU, separate otherwise.
    Prompts arrive as token ids and responses leave as token ids: the engine loads no tokenizer
    and detokenizes nothing; log-probs come back flat (one float per token).
    """

    def __init__(self, model_path: str, *, seed: int = 0, max_model_len: int = 512,
                 engine_kwargs: dict | None = None, in_process: bool | str = "auto"):
        from rllib_ext.llm.engine_version import check_vllm_version

        check_vllm_version()  # before vLLM is imported or an engine starts
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm.platforms import current_platform

        from rllib_ext.llm.vllm_logs import drop_expected_vllm_messages

        drop_expected_vllm_messages()

        if in_process == "auto":
            in_process = current_platform.is_cpu()
        # Read by vLLM when the engine is built.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        from vllm import LLM

        kwargs = dict(
            model=model_path, seed=seed, max_model_len=max_model_len,
            distributed_executor_backend="uni", skip_tokenizer_init=True,
            worker_extension_cls="rllib_ext.llm.weight_sync.WeightSyncExtension",
            # Behaviour log-probs of the distribution tokens are sampled from.
            logprobs_mode="processed_logprobs",
        )
        if current_platform.is_cpu():
            # float32 on AVX2; the CPU backend reads this as a fraction of the node's RAM.
            kwargs.update(dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
        kwargs.update(engine_kwargs or {})
        self.in_process = bool(in_process)
        # Set when a generation returned a non-finite log-prob: the KV cache may hold NaN/inf.
        self._kv_cache_dirty = False
        started = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_seconds = time.perf_counter() - started

    def generate(self, prompts, sampling):
        from vllm import SamplingParams

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature,
                                top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                                min_tokens=sampling.min_tokens, seed=sampling.seed, logprobs=0,
                                flat_logprobs=True,
                                detokenize=False)
        with self._engine_death_watch():
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                        use_tqdm=False)
        completions = [[Completion(list(sample.token_ids), sampled_token_logprobs(sample.logprobs),
                                   "length" if sample.finish_reason == "length" else "stop")
                        for sample in output.outputs] for output in outputs]
        if not all(math.isfinite(x) for group in completions for c in group for x in c.logprobs):
            self._kv_cache_dirty = True
        return completions

    @contextlib.contextmanager
    def _engine_death_watch(self, poll_s: float = 0.5):
        """vLLM's client notices a dead engine-core process (and marks itself dead) but a call
        already waiting for the engine's answer (a generation or a utility call such as a
        weight load) blocks forever; wake it with EngineDeadError."""
        client = getattr(self.llm.llm_engine, "engine_core", None)
        resources, outputs = getattr(client, "resources", None), getattr(client, "outputs_queue",
                                                                          None)
        if resources is None or outputs is None:  # in-process engine: nothing to watch
            yield
            return
        from vllm.v1.engine.exceptions import EngineDeadError

        done = threading.Event()

        def watch():
            while not done.wait(poll_s):
                if resources.engine_dead:
                    outputs.put(EngineDeadError())
                    for future in list(client.utility_results.values()):
                        if not future.done():
                            future.set_exception(EngineDeadError())
                    return

        watcher = threading.Thread(target=watch, daemon=True, name="engine-death-watch")
        watcher.start()
        try:
            yield
        finally:
            done.set()

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype

    def load_weight_buckets(self, buckets, *, version, count):
        """Stream the buckets into the engine; an engine in its own process gets each as
        (header, bytes), one RPC message per bucket."""
        with self._engine_death_watch():
            self.llm.collective_rpc("rllib_ext_begin_weight_sync", args=(version, count))
            try:
                for bucket in buckets:
                    args = (bucket,) if self.in_process \
                        else (bucket.header(), memoryview(bucket.payload))
                    self.llm.collective_rpc("rllib_ext_load_bucket", args=args)
            finally:  # also after a failed fetch: leave a valid model behind
                [report] = self.llm.collective_rpc("rllib_ext_finish_weight_sync")
            # Cached prefixes were computed with the old weights.
            self.llm.reset_prefix_cache()
            if self._kv_cache_dirty:  # see WeightSyncExtension.rllib_ext_clear_kv_cache
                self.llm.collective_rpc("rllib_ext_clear_kv_cache")
                self._kv_cache_dirty = False
        if report["error"]:
            raise WeightSyncError(report["error"])
        return report

    def close(self):
        if self.llm is not None:
            engine = getattr(self.llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(
                getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown:
                shutdown()
            self.llm = None


def sampled_token_logprobs(flat) -> list[float]:
    """The sampled token's log-prob at every position of a vLLM ``FlatLogprobs`` (the sampled
    token comes first among a position's entries)."""
    return [flat.logprobs[start] for start in flat.start_indices]


def make_backend(kind: str, model_path: str, *, seed: int = 0, max_model_len: int = 512,
                 engine_kwargs: dict | None = None,
                 engine_in_process: bool | str = "auto") -> GenerationBackend:
    if kind == "vllm":
        return VLLMBackend(model_path, seed=seed, max_model_len=max_model_len,
                           engine_kwargs=engine_kwargs, in_process=engine_in_process)
    if kind == "transformers":
        return TransformersBackend(model_path, seed=seed)
    raise ValueError(f"unknown generation backend '{kind}'. Fix: set generation_backend to "
                     "'vllm' or 'transformers'.")
