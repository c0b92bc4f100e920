"""GPU routes of the weight sync, through vLLM's weight-transfer API (vLLM 0.32,
``vllm.distributed.weight_transfer``): CUDA IPC handles where the learner and the engine share
a GPU (``gpu_layout: shared``), an NCCL broadcast from the learner's GPU to the engine's where
they sit on GPUs of their own (``gpu_layout: separate``), the routes verl, OpenRLHF and slime
take. Weights cross in the engine's dtype; the version is stamped on the runner through its
``set_state``, as on the bucketed route.

NOT MEASURED: this project's machines have no GPU, so these routes have never run. They start
only where they can (CUDA in the learner's process, the matching layout, the learner in the
algorithm's process); where they cannot, or starting fails, the run logs why and uses the
bucketed route (:mod:`rllib_ext.llm.weight_sync`), which works everywhere.

A transfer is synchronous: an env runner runs one call at a time, so the learner waits until
the runner has finished the requests queued before the transfer, then both take part in it.
"""

from __future__ import annotations

import logging
import socket

import torch

logger = logging.getLogger(__name__)

# weight_sync_route -> vLLM's weight-transfer backend, and the layout it needs.
VLLM_BACKENDS = {"cuda_ipc": "ipc", "nccl": "nccl"}
LAYOUT_OF_ROUTE = {"cuda_ipc": "shared", "nccl": "separate"}


def route_problem(config) -> str | None:
    """Why ``config.weight_sync_route`` cannot run in this process (None: it can)."""
    route = config.weight_sync_route
    if route == "buckets":
        return None
    from rllib_ext.llm.placement import plan_placement, visible_gpus

    if not torch.cuda.is_available():
        return "no CUDA device in this process"
    if config.generation_backend != "vllm":
        return "generation_backend is not vllm"
    if config.num_learners != 0:
        return ("the learner runs in actors of its own (num_learners > 0); the GPU routes "
                "drive the transfer from a learner in the algorithm's process")
    layout = plan_placement(config.gpu_layout, visible=visible_gpus(),
                            num_env_runners=config.num_env_runners,
                            shared_engine_memory=config.shared_gpu_engine_memory).layout
    if layout != LAYOUT_OF_ROUTE[route]:
        return (f"weight_sync_route '{route}' needs gpu_layout "
                f"'{LAYOUT_OF_ROUTE[route]}', the run's layout is '{layout}'")
    return None


def engine_kwargs(config) -> dict:
    """What an engine needs to receive on the configured GPU route (nothing for buckets)."""
    if config.weight_sync_route == "buckets" or route_problem(config) is not None:
        return {}
    return {"weight_transfer_config": {"backend": VLLM_BACKENDS[config.weight_sync_route]}}


class TransferredWeights:
    """A runner's ``set_state`` payload after a GPU transfer: the weights are in the engine
    already; loading them finishes vLLM's weight update (and the state stamps the version)."""

    def __init__(self, version: int):
        self.version = version

    def load_into(self, backend) -> dict:
        backend.llm.collective_rpc("finish_weight_update")
        backend.llm.reset_prefix_cache()
        return {"buckets_received": 0}


def _engine_call(runner, method: str, kwargs: dict) -> None:
    runner.backend.llm.collective_rpc(method, kwargs=kwargs)


class _RunnerClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol, forwarded to one env runner's engine."""

    def __init__(self, actor):
        self.actor, self.version = actor, 0

    def _call(self, method, **kwargs):
        import ray

        ray.get(self.actor.apply.remote(_engine_call, method, kwargs))

    def init_weight_transfer_engine(self, init_info):
        self._call("init_weight_transfer_engine", init_info=init_info)

    def start_weight_update(self):
        self._call("start_weight_update")

    def update_weights(self, update_info):
        self._call("update_weights", update_info=update_info)

    def finish_weight_update(self, weight_version=None):
        import ray
        from ray.rllib.core import COMPONENT_RL_MODULE
        from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

        from rllib_ext.llm.weight_sync import FORCE_WEIGHTS

        ray.get(self.actor.set_state.remote({COMPONENT_RL_MODULE: TransferredWeights(
            self.version), WEIGHTS_SEQ_NO: self.version, FORCE_WEIGHTS: True}))


def _source(model: torch.nn.Module, dtype: torch.dtype):
    """The model's parameters (Hugging Face names) as vLLM's ``WeightSource``, in ``dtype``."""
    from vllm.distributed.weight_transfer.base import ModuleSource, ParamMeta

    class CastSource(ModuleSource):
        def metadata(self):
            return [ParamMeta(m.name, dtype if m.dtype.is_floating_point else m.dtype, m.shape)
                    for m in super().metadata()]

        def __iter__(self):
            for name, tensor in super().__iter__():
                yield name, tensor.detach().to(dtype) if tensor.is_floating_point() else tensor

    return CastSource(model)


class GPUWeightRoute:
    """The learner side of a GPU route: one vLLM trainer engine per env runner, started on the
    first transfer to that runner (again after the runner restarts)."""

    def __init__(self, route: str, model: torch.nn.Module, dtype: torch.dtype,
                 bucket_bytes: int):
        self.route, self.model, self.dtype = route, model, dtype
        self.bucket_bytes = bucket_bytes  # NCCL's packed broadcast buffers
        self._engines: dict[int, tuple] = {}

    def start(self, runner_id: int, actor) -> None:
        """Rendezvous with this runner's engine, unless done already."""
        if runner_id not in self._engines:
            self._engines[runner_id] = self._start(actor)

    def send(self, runner_id: int, version: int) -> None:
        engine, client = self._engines[runner_id]
        client.version = version
        engine.send_weights()

    def forget(self, runner_id: int) -> None:
        """The runner restarted: its engine needs a new rendezvous."""
        engine, _ = self._engines.pop(runner_id, (None, None))
        if engine is not None:
            engine.shutdown()

    def _start(self, actor):
        client = _RunnerClient(actor)
        source = _source(self.model, self.dtype)
        if self.route == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import (
                NCCLTrainerInitInfo,
                NCCLTrainerWeightTransferEngine,
            )

            info = NCCLTrainerInitInfo(master_address=socket.gethostbyname(socket.gethostname()),
                                       master_port=_free_port(), world_size=2, rank=0,
                                       packed_buffer_size_bytes=self.bucket_bytes)
            engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=client,
                                                                  source=source)
        else:
            from vllm.distributed.weight_transfer.ipc_engine import (
                IPCTrainerInitInfo,
                IPCTrainerWeightTransferEngine,
            )

            engine = IPCTrainerWeightTransferEngine.trainer_init(IPCTrainerInitInfo(rank=0),
                                                                 client=client, source=source)
        return engine, client


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def start_route(config, learner_model, dtype: torch.dtype) -> GPUWeightRoute | None:
    """The configured GPU route (sending from ``learner_model()``), or None (bucketed route)
    with the reason logged."""
    if config.weight_sync_route == "buckets":
        return None
    problem = route_problem(config)
    if problem is not None:
        logger.warning("weight_sync_route '%s' cannot start (%s): weights go in buckets.",
                       config.weight_sync_route, problem)
        return None
    from rllib_ext.llm.weight_sync import bucket_bytes_from_mb

    return GPUWeightRoute(config.weight_sync_route, learner_model(), dtype,
                          bucket_bytes_from_mb(config.weight_sync_bucket_mb))
