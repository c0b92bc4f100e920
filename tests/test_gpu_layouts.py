"""GPU layouts, tested on the CPU: the layout follows the visible GPUs (Ray's logical GPU
resources), the one-GPU recipe's trial request fits one GPU, the two-GPU recipe is refused at
once on one GPU (never a silent wait), and GPU weight routes fall back to buckets where they
cannot start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rllib_ext.llm.placement import PlacementError, plan_placement

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layout, visible, runners, expected", [
    ("cpu", 0, 1, ("cpu", 0, 0, None)),
    ("separate", 2, 1, ("separate", 1, 1, None)),
    ("separate", 3, 2, ("separate", 1, 1, None)),
    ("shared", 1, 1, ("shared", 0.5, 0.5, 0.4)),
    ("shared", 4, 2, ("shared", 0.25, 0.5, 0.2)),
    ("auto", 1, 1, ("shared", 0.5, 0.5, 0.4)),
    ("auto", 2, 1, ("separate", 1, 1, None)),
    ("auto", 2, 2, ("shared", 0.25, 0.5, 0.2)),
])
def test_layouts_place_engines_and_learner(layout, visible, runners, expected):
    placement = plan_placement(layout, visible=visible, num_env_runners=runners)
    assert (placement.layout, placement.gpus_per_env_runner, placement.gpus_per_learner,
            placement.engine_memory_fraction) == expected
    assert placement.total_gpus(runners) <= max(visible, 0) or layout == "cpu"


@pytest.mark.parametrize("layout, visible, message", [
    ("separate", 1, "2 GPUs, but 1 visible. Fix: on one GPU use "
                    "tuned_examples/vcpo_math_1gpu.yaml"),
    ("shared", 0, "no CUDA device is visible"),
    ("auto", 0, "on CPU use tuned_examples/vcpo_math_tiny.yaml"),
    ("tpu", 1, "gpu_layout must be one of"),
])
def test_layouts_that_do_not_fit_are_refused_with_the_fix(layout, visible, message):
    with pytest.raises(PlacementError, match=message.replace(".", r"\.").replace("(", r"\(")):
        plan_placement(layout, visible=visible, num_env_runners=1)


PLACEMENT_PROBE = """
import json
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from rllib_ext.algorithms.vcpo.vcpo import VCPO
from rllib_ext.cli.experiment import build_experiment, load_yaml_file

def settings(path, **overrides):
    # As `rllib train file` hands the config to Tune (validated on the way).
    [(name, spec)] = load_yaml_file(path).items()
    return build_experiment(name, spec, path, config_override=overrides).param_space

ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
out = {}
request = VCPO.default_resource_request(settings("tuned_examples/vcpo_math_1gpu.yaml"))
out["bundles"] = request.bundles
group = placement_group(request.bundles, strategy=request.strategy)
out["placed"] = group.wait(timeout_seconds=60)
remove_placement_group(group)
auto = VCPO.default_resource_request(settings("tuned_examples/vcpo_math.yaml",
                                              gpu_layout="auto"))
out["auto_bundles"] = auto.bundles
try:
    VCPO.default_resource_request(settings("tuned_examples/vcpo_math.yaml"))
except Exception as error:
    out["two_gpu_error"] = str(error)
print("RESULT " + json.dumps(out))
"""


def test_one_gpu_recipe_fits_one_gpu_and_two_gpu_recipe_is_refused_on_it():
    done = subprocess.run([sys.executable, "-c", PLACEMENT_PROBE], cwd=REPO,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled"),
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    # The trial: [driver + learner, env runner (engine)]; together one GPU, both on it.
    [learner, engine] = out["bundles"]
    assert learner["GPU"] == 0.5 and engine["GPU"] == 0.5
    assert sum(bundle.get("GPU", 0) for bundle in out["bundles"]) == 1
    assert out["placed"] is True  # Ray placed it on the one (logical) GPU
    assert sum(bundle.get("GPU", 0) for bundle in out["auto_bundles"]) == 1
    assert "gpu_layout 'separate'" in out["two_gpu_error"]
    assert "2 GPUs, but 1 visible" in out["two_gpu_error"]
    assert "vcpo_math_1gpu.yaml" in out["two_gpu_error"]
    assert "gpu_layout auto: 1 GPU(s) visible -> 'shared'" in done.stderr


def route_config(**settings):
    from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig

    return VCPOConfig().environment("MathEnv").llm_rollouts(**settings)


def test_gpu_weight_routes_fall_back_to_buckets_with_the_reason(caplog, monkeypatch):
    import torch

    from rllib_ext.llm import gpu_weight_routes, placement

    config = route_config(weight_sync_route="nccl")
    with caplog.at_level("WARNING"):
        assert gpu_weight_routes.start_route(config, lambda: pytest.fail("model read"),
                                             torch.float32) is None
    assert "weight_sync_route 'nccl' cannot start (no CUDA device in this process): weights " \
           "go in buckets" in caplog.text
    assert gpu_weight_routes.engine_kwargs(config) == {}  # the engine starts as usual
    # With CUDA, a route needs its layout.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(placement, "visible_gpus", lambda: 1)
    shared = route_config(weight_sync_route="nccl", gpu_layout="shared")
    assert gpu_weight_routes.route_problem(shared) == (
        "weight_sync_route 'nccl' needs gpu_layout 'separate', the run's layout is 'shared'")
    ipc = route_config(weight_sync_route="cuda_ipc", gpu_layout="auto")
    assert gpu_weight_routes.route_problem(ipc) is None
    assert gpu_weight_routes.engine_kwargs(ipc) == {"weight_transfer_config": {"backend": "ipc"}}
    remote_learner = route_config(weight_sync_route="cuda_ipc", gpu_layout="shared") \
        .learners(num_learners=1)
    assert "num_learners > 0" in gpu_weight_routes.route_problem(remote_learner)


def test_unknown_weight_sync_route_or_bucket_size_is_refused():
    with pytest.raises(ValueError, match="weight_sync_route must be one of"):
        route_config(weight_sync_route="rdma").validate()
    with pytest.raises(ValueError, match="weight_sync_bucket_mb must be a number > 0"):
        route_config(weight_sync_bucket_mb=0).validate()


def test_the_bucketed_route_adds_nothing_to_the_engine():
    from rllib_ext.llm import gpu_weight_routes

    assert gpu_weight_routes.engine_kwargs(route_config()) == {}


def test_gpu_routes_send_in_the_engine_dtype():
    import torch

    from rllib_ext.llm.gpu_weight_routes import _source

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    source = _source(model, torch.bfloat16)
    assert [(m.name, m.dtype, m.shape) for m in source.metadata()] == [
        ("0.weight", torch.bfloat16, (2, 3)), ("0.bias", torch.bfloat16, (2,))]
    assert all(t.dtype == torch.bfloat16 for _, t in source)
