"""Weight sync in buckets: the packing (pure), and with the real vLLM engine in its own
process (vLLM's GPU layout, where every bucket is one RPC message): many small buckets load the
same weights as one, no message exceeds the bucket size, a lost bucket fails by name."""

import contextlib
import dataclasses
import sys

import numpy as np
import pytest
import torch
from ray import cloudpickle
from ray.rllib.core import COMPONENT_RL_MODULE
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rllib_ext.llm.env_runner import LLMEnvRunner
from rllib_ext.llm.generation import SamplingSettings
from rllib_ext.llm.rollout_config import LLMRolloutConfig
from rllib_ext.llm.tiny import TINY_ARITHMETIC_DATASET
from rllib_ext.llm.weight_sync import (
    BucketAssembler,
    WeightSyncError,
    load_state_dict,
    pack_weight_buckets,
    plan_buckets,
    put_weight_buckets,
)

# Functions defined here run inside the runner actor (Ray's cloudpickle, by value).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# ------------------------------------------------------------------ packing (no engine)


def named_tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (100, 128), "layer.0.q.weight": (128, 128), "norm.weight": (128,),
              "scalar": (), "lm_head.weight": (100, 128)}
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@pytest.mark.parametrize("bucket_bytes", [4, 1000, 30_000, 65_536, 10**9])
def test_buckets_respect_the_size_and_cover_every_element_once(bucket_bytes):
    tensors = named_tensors()
    plan = plan_buckets([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                        bucket_bytes)
    covered = {name: 0 for name in tensors}
    for slices in plan:
        assert slices[-1].offset + slices[-1].numel * 4 <= bucket_bytes
        for s in slices:
            assert s.start == covered[s.name] and s.offset % 4 == 0
            covered[s.name] += s.numel
    assert covered == {name: t.numel() for name, t in tensors.items()}
    if bucket_bytes == 30_000:  # the 51 kB embedding spans two buckets
        assert sum(s.name == "embed.weight" for slices in plan for s in slices) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_then_assemble_gives_the_tensors_in_the_engine_dtype(dtype):
    tensors = named_tensors()
    buckets = list(pack_weight_buckets(tensors.items(), version=7, bucket_bytes=20_000,
                                       dtype=dtype))
    assert len(buckets) >= 5 and max(b.nbytes for b in buckets) <= 20_000
    assert {(b.version, b.count) for b in buckets} == {(7, len(buckets))}
    assembler = BucketAssembler(7, len(buckets))
    received = {}
    for bucket in reversed(buckets):  # order does not matter
        received.update((name, t.clone()) for name, t in assembler.add(bucket))
    assembler.finish()
    assert received.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert received[name].dtype == dtype
        assert torch.equal(received[name], tensor.to(dtype))


def test_a_lost_repeated_or_foreign_bucket_is_a_weight_sync_error():
    buckets = list(pack_weight_buckets(named_tensors().items(), version=3, bucket_bytes=20_000))
    assembler = BucketAssembler(3, len(buckets))
    for bucket in buckets[:2] + buckets[3:]:
        assembler.add(bucket)
    with pytest.raises(WeightSyncError, match=rf"bucket\(s\) \[2\] of {len(buckets)} never "
                                              "arrived"):
        assembler.finish()
    with pytest.raises(WeightSyncError, match="received bucket 0 .* again"):
        assembler.add(buckets[0])
    other = next(pack_weight_buckets(named_tensors().items(), version=4, bucket_bytes=20_000))
    with pytest.raises(WeightSyncError, match="for version 4"):
        BucketAssembler(3, len(buckets)).add(other)


def test_a_bucket_smaller_than_one_element_is_refused():
    with pytest.raises(ValueError, match="raise weight_sync_bucket_mb"):
        plan_buckets([("w", torch.float32, (3,))], 2)


# ------------------------------------------------------------------ the real engine

PROMPTS = [[1, 6, 11, 7, 13], [1, 9, 11, 6, 6, 13], [1, 7, 11, 7, 13]]  # "<bos>1+2=", ...
SEEDED = SamplingSettings(n=4, temperature=1.0, max_tokens=6, seed=11)
SMALL_BUCKET = 20_000  # the tiny model (1.8 MB) crosses in 91 buckets


@pytest.fixture(scope="module")
def separate_engine_runner(ray_session, tiny_model_path):
    """A remote env runner whose vLLM engine core runs in a process of its own."""
    from rllib_ext import registry

    registry.register_project_envs()
    config = (LLMRolloutConfig()
              .environment("MathEnv", env_config={"dataset": TINY_ARITHMETIC_DATASET})
              .llm_rollouts(prompts_per_sample=4, num_generations=4, max_response_tokens=6,
                            engine_in_process=False)
              .debugging(seed=0))
    actor = ray_session.remote(num_cpus=1)(LLMEnvRunner).remote(
        config=config, worker_index=1, num_workers=1)
    yield actor
    with contextlib.suppress(Exception):  # the last test makes the runner exit
        ray_session.get(actor.stop.remote(), timeout=60)
    ray_session.kill(actor)


def hf_weights(path, noise_seed=None):
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    if noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=generator)
                 for k, v in state.items()}
    return state


def load_and_generate(runner, weights, version, bucket_bytes):
    """Load ``weights`` in buckets into the runner's engine, then generate (seeded)."""
    report = load_state_dict(runner.backend, weights, version=version,
                             bucket_bytes=bucket_bytes)
    groups = runner.backend.generate(PROMPTS, SEEDED)
    return report, [(c.token_ids, c.logprobs) for group in groups for c in group]


def test_many_small_buckets_load_what_one_bucket_loads(ray_session, separate_engine_runner,
                                                       tiny_model_path):
    weights, other = hf_weights(tiny_model_path, 1), hf_weights(tiny_model_path, 2)
    call = separate_engine_runner.apply.remote
    one_report, one_shot = ray_session.get(call(load_and_generate, weights, 1, 10**9))
    _, in_between = ray_session.get(call(load_and_generate, other, 2, 10**9))
    report, bucketed = ray_session.get(call(load_and_generate, weights, 3, SMALL_BUCKET))
    assert one_report["buckets_received"] == 1 and report["buckets_received"] == 91
    # Measured where the engine receives them: no message exceeded the bucket size.
    assert report["max_bucket_bytes"] <= SMALL_BUCKET
    assert in_between != one_shot  # the engine really held other weights in between
    assert [tokens for tokens, _ in bucketed] == [tokens for tokens, _ in one_shot]
    assert np.array_equal(np.concatenate([lp for _, lp in bucketed]),
                          np.concatenate([lp for _, lp in one_shot]))


def test_a_lost_bucket_fails_the_sync_by_name_and_the_runner_exits(ray_session,
                                                                   separate_engine_runner,
                                                                   tiny_model_path):
    from ray.exceptions import RayActorError

    weights = hf_weights(tiny_model_path, 3)

    def load_without_bucket_5(runner):
        buckets = pack_weight_buckets(weights.items(), version=4, bucket_bytes=SMALL_BUCKET,
                                      dtype=runner.backend.dtype)
        try:
            runner.backend.load_weight_buckets((b for b in buckets if b.index != 5),
                                               version=4, count=91)
        except WeightSyncError as error:
            return str(error)

    message = ray_session.get(separate_engine_runner.apply.remote(load_without_bucket_5))
    assert message.startswith("weight sync to version 4 is incomplete: bucket(s) [5] of 91 "
                              "never arrived")
    # The same loss on the runner's own path (a manifest with a missing bucket): the runner
    # exits (RLlib restarts it, see test_vcpo_reliability) instead of sampling from a partial
    # update.
    manifest = put_weight_buckets(weights.items(), version=5, bucket_bytes=SMALL_BUCKET)
    lossy = dataclasses.replace(manifest, bucket_refs=manifest.bucket_refs[1:])
    with pytest.raises(RayActorError):
        ray_session.get(separate_engine_runner.set_state.remote(
            {COMPONENT_RL_MODULE: lossy, WEIGHTS_SEQ_NO: 5}), timeout=120)
