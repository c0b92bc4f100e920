"""VCPO end to end with the real vLLM engine: the tiny recipe learns, TensorBoard holds the
metrics, checkpoints resume the run, the GPU recipe refuses a CPU machine at once."""

import json
from pathlib import Path

import numpy as np
import pytest
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rllib_ext.cli.main import main

pytestmark = pytest.mark.slow

TINY = "tuned_examples/vcpo_math_tiny.yaml"


def trial_dir(storage: Path, experiment: str) -> Path:
    [trial] = [p for p in (storage / experiment).iterdir() if p.is_dir()]
    return trial


def results(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]


def tensorboard_tags(trial: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in trial.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"histograms": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"]) | set(accumulator.Tags()["histograms"])
    return tags


def test_tiny_recipe_raises_heldout_accuracy_and_logs_everything(cli, tiny_model_path,
                                                                  tmp_path):
    done = cli("train", "file", TINY, "--stop", '{"training_iteration": 15}',
               "--storage-path", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "heldout" in done.stdout and "iter 15 |" in done.stdout
    trial = trial_dir(tmp_path, "vcpo-math-tiny")
    history = results(trial)
    build_info = json.loads((Path(tiny_model_path) / "rllib_ext_build.json").read_text())
    warm_start = build_info["heldout_greedy_accuracy"]
    heldout = [r["evaluation"]["accuracy"] for r in history]
    assert max(heldout[-3:]) >= warm_start + 0.15, heldout
    last = history[-1]
    learner = last["learners"]["default_policy"]
    for key in ("ess_ratio", "ess_ratio_clipped", "ess_lr_scale", "effective_lr",
                "is_weight_mean", "is_weight_max", "k3_kl_behaviour_policy",
                "trajectory_grad_norm_mean", "staleness_mean", "reward_mean"):
        assert np.isfinite(learner[key]), key
    assert 0 < learner["ess_ratio"] <= 1 and learner["staleness_mean"] <= 4
    assert last["vcpo"]["policy_version"] == 150  # 15 iterations x 10 updates
    tags = tensorboard_tags(trial)
    for tag in ("learners/default_policy/ess_ratio",
                "learners/default_policy/effective_lr",
                "learners/default_policy/staleness",
                "learners/__all_modules__/grad_norm",
                "env_runners/accuracy", "env_runners/tokens_per_s",
                "evaluation/accuracy", "vcpo/samples_per_s",
                "vcpo/learner_busy_fraction"):
        assert tag in tags, (tag, sorted(t for t in tags if "learners" in t)[:40])


def test_checkpoint_resumes_version_optimizer_and_data_position(ray_session, tiny_model_path,
                                                               tmp_path):
    from ray.rllib.algorithms.algorithm import Algorithm

    from rllib_ext.algorithms.vcpo.vcpo import VCPOConfig
    from rllib_ext.llm.env_runner import ENV_STATE
    from rllib_ext.llm.tiny import TINY_ARITHMETIC_DATASET

    config = (VCPOConfig().environment("MathEnv", env_config={"dataset": TINY_ARITHMETIC_DATASET})
              .llm_rollouts(prompts_per_sample=4, num_generations=4, max_response_tokens=6)
              .training(lr=1e-4, train_batch_size_per_learner=16, max_staleness=2,
                        updates_per_iteration=3))
    algo = config.build_algo()
    algo.train()
    algo.train()
    saved = algo.save_to_path(str(tmp_path / "ckpt"))
    accuracy = algo.evaluate_accuracy()["accuracy"]
    state = algo.get_state()
    version = state["vcpo"]["learner_version"]
    assert version == 6
    positions = {i: s[ENV_STATE] for i, s in state["vcpo"]["runner_states"].items()}
    optimizer_state = algo.learner_group.get_state()[COMPONENT_LEARNER]["optimizer"]
    algo.stop()

    restored = Algorithm.from_checkpoint(saved)
    assert restored.iteration == 2
    # Same weights in the engine: held-out (greedy) accuracy continues where it was.
    assert restored.evaluate_accuracy()["accuracy"] == accuracy
    restored_state = restored.get_state()
    assert restored_state["vcpo"]["learner_version"] == version
    assert restored_state[COMPONENT_LEARNER_GROUP][COMPONENT_LEARNER][WEIGHTS_SEQ_NO] == version
    runner_positions = dict(restored.env_runner_group.foreach_env_runner(
        lambda runner: (runner.worker_index, runner.get_state()[ENV_STATE]),
        local_env_runner=False))
    assert runner_positions == positions
    restored_optimizer = restored.learner_group.get_state()[COMPONENT_LEARNER]["optimizer"]
    name = "default_policy_default_optimizer"
    step = optimizer_state[name]["state"]["state"][0]
    restored_step = restored_optimizer[name]["state"]["state"][0]
    assert float(step["step"]) == float(restored_step["step"]) == 6
    assert np.allclose(step["exp_avg"], restored_step["exp_avg"])
    result = restored.train()
    assert result["training_iteration"] == 3
    assert result["vcpo"]["policy_version"] == version + 3
    restored.stop()


def test_gpu_recipe_stops_at_once_on_a_cpu_machine(capsys):
    code = main(["train", "file", "tuned_examples/vcpo_math.yaml"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no CUDA device is visible" in err and "vcpo_math_tiny.yaml" in err
