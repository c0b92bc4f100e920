"""Weight sync from the learner to the generation engines, in buckets of bounded size.

The learner's weights (Hugging Face names) are cast to the engine's dtype (a bf16 engine gets
bf16 bytes) and cut into buckets of at most ``bucket_bytes`` each: a tensor larger than a bucket
is split across several (a 1.5B model's embedding is ~470 MB in bf16). Every bucket carries the
policy version, its index and the bucket count, so the receiver knows when an update is whole.
No message on the way (a Ray object from the learner, an RPC into the engine's process) is
larger than one bucket: vLLM's RPC encoding refuses byte strings over 4 GiB, a 1.5B float32
state dict is ~6.2 GB.

Inside the engine the buckets stream through vLLM's layerwise reload (the path of its own
weight-transfer backends): ``initialize_layerwise_reload`` at the first bucket, the model's
``load_weights`` per bucket (a layer is processed as soon as all its tensors arrived),
``finalize_layerwise_reload`` after the last; memory beyond the model is one bucket plus the
tensors split across buckets that are not complete yet. A missing, repeated or foreign bucket
raises :class:`WeightSyncError`; the engine then holds a partial update and its env runner
restarts (see ``LLMEnvRunner.set_state``).

The route through Ray and the engine's RPC is the default everywhere and the one tested on the
CPU. GPU routes (CUDA IPC, NCCL) live in :mod:`rllib_ext.llm.gpu_weight_routes`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_BUCKET_MB = 256
# In a state for an env runner's set_state: load the weights whatever their version and adopt
# it (a restored run's learner may be behind the runner's engine).
FORCE_WEIGHTS = "force_weights"


class WeightSyncError(RuntimeError):
    """A weight update did not arrive whole (a bucket lost, repeated or from another update)."""


@dataclass(frozen=True)
class TensorSlice:
    """Elements ``[start, start + numel)`` of the flattened tensor ``name`` (full shape
    ``shape``), stored at byte ``offset`` of a bucket's payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    numel: int
    offset: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class WeightBucket:
    """One message of a weight update: ``payload`` (uint8, at most the bucket size) holds the
    bytes of ``slices``."""

    version: int
    index: int
    count: int
    slices: list[TensorSlice]
    payload: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.payload.nbytes)

    def header(self) -> tuple:
        """Plain values for an RPC whose encoding knows no dataclasses."""
        return (self.version, self.index, self.count,
                [[s.name, s.dtype, list(s.shape), s.start, s.numel, s.offset]
                 for s in self.slices])

    @classmethod
    def from_header(cls, header, payload) -> WeightBucket:
        version, index, count, slices = header
        payload = payload if isinstance(payload, np.ndarray) \
            else np.frombuffer(payload, dtype=np.uint8)
        return cls(version, index, count,
                   [TensorSlice(name, dtype, tuple(shape), start, numel, offset)
                    for name, dtype, shape, start, numel, offset in slices], payload)


def bucket_bytes_from_mb(bucket_mb: float) -> int:
    return max(1, int(bucket_mb * 2**20))


def plan_buckets(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 bucket_bytes: int) -> list[list[TensorSlice]]:
    """Cut tensors (name, dtype, shape), in order, into buckets of at most ``bucket_bytes``.

    Greedy: each bucket is filled up to the limit, a tensor that does not fit continues in the
    next bucket; slices start at offsets aligned to their element size.
    """
    buckets: list[list[TensorSlice]] = [[]]
    used = 0
    for name, dtype, shape in tensors:
        item = torch.empty((), dtype=dtype).element_size()
        if item > bucket_bytes:
            raise ValueError(f"weight_sync_bucket_mb holds {bucket_bytes} bytes, less than "
                             f"one {dtype} element. Fix: raise weight_sync_bucket_mb.")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        start = 0
        while start < numel:
            offset = -(-used // item) * item
            room = (bucket_bytes - offset) // item
            if room <= 0:
                buckets.append([])
                used, offset, room = 0, 0, bucket_bytes // item
            take = min(room, numel - start)
            buckets[-1].append(TensorSlice(name, str(dtype).removeprefix("torch."),
                                           tuple(shape), start, take, offset))
            used = offset + take * item
            start += take
    return buckets if buckets[0] else []


def pack_weight_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int,
                        bucket_bytes: int, dtype: torch.dtype | None = None
                        ) -> Iterator[WeightBucket]:
    """Yield the buckets of ``named_tensors``, floating tensors in ``dtype``. Slices are cast
    (and copied off a GPU) as they are packed: one bucket's payload exists at a time."""
    tensors = {name: torch.as_tensor(tensor).detach() for name, tensor in named_tensors}
    wire_dtype = {name: dtype if dtype is not None and t.is_floating_point() else t.dtype
                  for name, t in tensors.items()}
    plan = plan_buckets([(name, wire_dtype[name], tuple(t.shape))
                         for name, t in tensors.items()], bucket_bytes)
    for index, slices in enumerate(plan):
        last = slices[-1]
        payload = np.empty(last.offset + last.numel * last.torch_dtype.itemsize, dtype=np.uint8)
        target = torch.from_numpy(payload)
        for s in slices:
            dtype_ = s.torch_dtype
            values = tensors[s.name].reshape(-1)[s.start:s.start + s.numel]
            target[s.offset:s.offset + s.numel * dtype_.itemsize].view(dtype_).copy_(values)
        yield WeightBucket(version, index, len(plan), slices, payload)


class BucketAssembler:
    """Receiver side of one update: turns arriving buckets into whole (name, tensor) pairs and
    checks that the update arrived whole (:meth:`finish`)."""

    def __init__(self, version: int, count: int):
        self.version, self.count = version, count
        self.received: set[int] = set()
        self.max_bucket_bytes = 0
        # Tensors split across buckets, until their last slice arrives.
        self._partial: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
        """The tensors this bucket completes (views into its payload where a tensor lies in
        one bucket: load them before the payload is dropped)."""
        if (bucket.version, bucket.count) != (self.version, self.count) \
                or bucket.index in self.received or not 0 <= bucket.index < self.count:
            raise WeightSyncError(
                f"weight sync to version {self.version} ({self.count} buckets) received bucket "
                f"{bucket.index} of {bucket.count} for version {bucket.version}"
                + (" again" if bucket.index in self.received else "") + ".")
        self.received.add(bucket.index)
        self.max_bucket_bytes = max(self.max_bucket_bytes, bucket.nbytes)
        with warnings.catch_warnings():  # payloads from Ray's object store are read-only
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(bucket.payload)
        complete = []
        for s in bucket.slices:
            dtype = s.torch_dtype
            values = data[s.offset:s.offset + s.numel * dtype.itemsize].view(dtype)
            total = int(np.prod(s.shape, dtype=np.int64)) if s.shape else 1
            if s.numel == total:
                complete.append((s.name, values.view(s.shape)))
                continue
            buffer, filled = self._partial.get(s.name) or (torch.empty(total, dtype=dtype), 0)
            buffer[s.start:s.start + s.numel] = values
            filled += s.numel
            if filled == total:
                del self._partial[s.name]
                complete.append((s.name, buffer.view(s.shape)))
            else:
                self._partial[s.name] = (buffer, filled)
        return complete

    def finish(self) -> None:
        missing = sorted(set(range(self.count)) - self.received)
        if missing or self._partial:
            raise WeightSyncError(
                f"weight sync to version {self.version} is incomplete: bucket(s) {missing} of "
                f"{self.count} never arrived" + (f"; tensors left partial: "
                                                 f"{sorted(self._partial)}" if self._partial
                                                 else "") + ".")


@dataclass
class WeightManifest:
    """What an env runner's ``set_state`` receives in place of a module state: the buckets of
    one update as Ray object refs (one object per bucket), fetched one at a time."""

    version: int
    count: int
    bucket_bytes: int
    total_bytes: int
    bucket_refs: list

    def load_into(self, backend) -> dict:
        return backend.load_weight_buckets(fetch_weight_buckets(self), version=self.version,
                                           count=self.count)


def put_weight_buckets(named_tensors, *, version: int, bucket_bytes: int,
                       dtype: torch.dtype | None = None) -> WeightManifest:
    """Pack and ``ray.put`` the buckets of an update (one bucket in this process at a time)."""
    import ray

    refs, total = [], 0
    for bucket in pack_weight_buckets(named_tensors, version=version,
                                      bucket_bytes=bucket_bytes, dtype=dtype):
        total += bucket.nbytes
        refs.append(ray.put(bucket))
    return WeightManifest(version, len(refs), bucket_bytes, total, refs)


def fetch_weight_buckets(manifest: WeightManifest) -> Iterator[WeightBucket]:
    """The buckets of ``manifest``, fetched from Ray's object store one at a time; a bucket
    that cannot be fetched or exceeds the bucket size raises :class:`WeightSyncError`."""
    import ray
    from ray.exceptions import RayError

    for index, ref in enumerate(manifest.bucket_refs):
        try:
            bucket = ray.get(ref)
        except RayError as error:
            raise WeightSyncError(f"weight sync to version {manifest.version}: bucket {index} "
                                  f"of {manifest.count} could not be fetched ({error!r}).") \
                from error
        if bucket.nbytes > manifest.bucket_bytes:
            raise WeightSyncError(f"weight sync to version {manifest.version}: bucket {index} "
                                  f"holds {bucket.nbytes} bytes, over the bucket size "
                                  f"{manifest.bucket_bytes}.")
        yield bucket


def load_state_dict(backend, state_dict: dict[str, torch.Tensor], *, version: int = 0,
                    bucket_bytes: int = DEFAULT_BUCKET_MB * 2**20) -> dict:
    """Load a (Hugging Face) state dict into a generation backend, in buckets."""
    buckets = pack_weight_buckets(state_dict.items(), version=version,
                                  bucket_bytes=bucket_bytes, dtype=backend.dtype)
    first = next(buckets)
    return backend.load_weight_buckets(itertools.chain([first], buckets), version=version,
                                       count=first.count)


def _quiet_layers_without_weights() -> None:
    """vLLM's layerwise reload warns "<layer>: Failed to load weights" at every sync for
    layers that hold no checkpoint tensors (rotary embeddings: their cache is computed, and
    kept); nothing failed, so that line is dropped."""
    import logging

    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _NoWeightlessLayerWarning) for f in layerwise.filters):
        layerwise.addFilter(_NoWeightlessLayerWarning())


class _NoWeightlessLayerWarning:
    def filter(self, record) -> bool:
        return not (record.getMessage().endswith(": Failed to load weights")
                    and record.getMessage().startswith("RotaryEmbedding"))


class WeightSyncExtension:
    """vLLM worker extension: weight updates in buckets, loaded in place into the running
    engine (vLLM's layerwise reload; ``model.load_weights`` alone fails on CPU after start-up,
    where weights are repacked), and KV-cache clearing.

    Buckets arrive as :class:`WeightBucket` (in-process engine) or as (header, bytes) (engine
    in its own process, where RPC arguments are serialised). A sync error is kept, not raised,
    until :meth:`rllib_ext_finish_weight_sync` reports it: the caller raises it in its own
    process as a :class:`WeightSyncError` (vLLM's RPC would turn it into a bare Exception).
    """

    def rllib_ext_begin_weight_sync(self, version: int, count: int) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        _quiet_layers_without_weights()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._rllib_ext_sync = BucketAssembler(version, count)
        self._rllib_ext_sync_error = None

    def rllib_ext_load_bucket(self, bucket, payload=None) -> None:
        from vllm.config import set_current_vllm_config

        if payload is not None:
            bucket = WeightBucket.from_header(bucket, payload)
        if self._rllib_ext_sync_error is not None:
            return
        try:
            tensors = self._rllib_ext_sync.add(bucket)
        except WeightSyncError as error:
            self._rllib_ext_sync_error = str(error)
            return
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(tensors)

    def rllib_ext_finish_weight_sync(self) -> dict:
        """Finish the update, also an incomplete one (the model stays a valid, if mixed,
        model); returns what arrived and the first error, if any."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        sync = self._rllib_ext_sync
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(),
                                      self.vllm_config.model_config)
        # What the worker's own reload_weights resets after a load.
        self.model_runner.reset_lora_state()
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()
        error = self._rllib_ext_sync_error
        if error is None:
            try:
                sync.finish()
            except WeightSyncError as incomplete:
                error = str(incomplete)
        self._rllib_ext_sync = None
        return {"error": error, "buckets_received": len(sync.received),
                "max_bucket_bytes": sync.max_bucket_bytes}

    def rllib_ext_clear_kv_cache(self) -> None:
        """Zero every KV-cache block: attention reads the unused slots of a block with weight
        0, and 0 * NaN is NaN, so values left by a non-finite forward pass poison later
        sequences (measured: NaN log-probs for 8+ samples after finite weights came back)."""
        pending = list(self.model_runner.kv_caches)
        while pending:
            cache = pending.pop()
            if isinstance(cache, torch.Tensor):
                cache.zero_()
            else:
                pending.extend(cache)
