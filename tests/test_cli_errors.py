"""Each kind of bad input gives one clear paragraph (file, key, fix) and exit code 2."""

import textwrap

import pytest

from rllib_ext.cli.main import main

GOOD = textwrap.dedent("""
    exp:
      run: PPO
      env: CartPole-v1
      config:
        lr: 0.001
""")


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_main(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.err


def assert_one_paragraph(err):
    assert err.startswith("rllib: error: ")
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert "Fix:" in err


def test_missing_file(tmp_path, capsys):
    code, err = run_main(capsys, "train", "file", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert_one_paragraph(err)
    assert "nope.yaml" in err and "file not found" in err


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    path = write(tmp_path, "exp:\n  run: PPO\n  config:\n    lr: [1\n")
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert_one_paragraph(err)
    assert "YAML syntax error at line" in err and path in err


def test_unknown_algorithm_lists_known_ones(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("run: PPO", "run: PPOO"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert_one_paragraph(err)
    assert "unknown algorithm 'PPOO'" in err and "Did you mean 'PPO'" in err
    assert "key 'exp.run'" in err
    for known in ("APPO", "IMPALA", "PPO", "SAC"):
        assert known in err


def test_unknown_env(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("CartPole-v1", "CartPol-v1"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert_one_paragraph(err)
    assert "unknown environment 'CartPol-v1'" in err and "'CartPole-v1'" in err
    assert "key 'exp.env'" in err


def test_unknown_env_module_path(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("CartPole-v1", "no_such_pkg.envs:Foo"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert_one_paragraph(err)
    assert "no_such_pkg" in err


def test_unknown_config_key_suggests_nearest(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("lr: 0.001", "lrr: 0.001"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert_one_paragraph(err)
    assert "unknown config key 'lrr'" in err and "Did you mean 'lr'" in err
    assert "key 'exp.config.lrr'" in err


def test_unknown_config_key_from_command_line(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    code, err = run_main(capsys, "train", "file", path, "--config", '{"gama": 0.9}')
    assert code == 2
    assert "unknown config key 'gama'" in err and "Did you mean 'gamma'" in err


def test_wrong_type(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("lr: 0.001", "lr: fast"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert_one_paragraph(err)
    assert "expected a number for 'lr', got str 'fast'" in err
    assert "key 'exp.config.lr'" in err


def test_wrong_type_bool(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("lr: 0.001", "explore: 3"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert "expected a boolean" in err and "explore" in err


def test_wrong_type_inside_grid_search(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("lr: 0.001", "lr: {grid_search: [0.001, oops]}"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert "got str 'oops'" in err


def test_value_rejected_by_rllib_validation(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("lr: 0.001", "num_env_runners: 2\n    num_learners: 0\n"
                                        "    train_batch_size_per_learner: 100\n"
                                        "    minibatch_size: 1000"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert_one_paragraph(err)
    assert "rejected by PPO" in err and "minibatch_size" in err


def test_unknown_experiment_key(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("run: PPO", "run: PPO\n  stpo: {training_iteration: 1}"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert "unknown experiment key 'stpo'" in err and "Did you mean 'stop'" in err


def test_bad_json_override(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    code, err = run_main(capsys, "train", "file", path, "--stop", "{training_iteration: 2}")
    assert code == 2
    assert_one_paragraph(err)
    assert "--stop is not valid JSON" in err


def test_non_numeric_stop(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    code, err = run_main(capsys, "train", "file", path, "--stop", '{"training_iteration": "x"}')
    assert code == 2
    assert "stop criterion 'training_iteration' must be a number" in err


def test_bad_search_space(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("lr: 0.001", "lr: {loguniform: [0.01, 0.001]}"))
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert "`loguniform` needs [low, high]" in err


def test_missing_env(tmp_path, capsys):
    path = write(tmp_path, "exp:\n  run: PPO\n")
    code, err = run_main(capsys, "train", "file", path)
    assert code == 2
    assert "no environment given" in err


def test_restore_path_not_found(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    code, err = run_main(capsys, "train", "file", path, "--restore", str(tmp_path / "ckpt"))
    assert code == 2
    assert "checkpoint path not found" in err and "--restore" in err


def test_restore_dir_without_checkpoint(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    (tmp_path / "empty").mkdir()
    code, err = run_main(capsys, "train", "file", path, "--restore", str(tmp_path / "empty"))
    assert code == 2
    assert "no RLlib checkpoint found" in err


def test_quick_run_needs_algo_and_env(capsys):
    code, err = run_main(capsys, "train", "--algo", "PPO")
    assert code == 2
    assert "nothing to train" in err


def test_quick_run_unknown_algo(capsys):
    code, err = run_main(capsys, "train", "--algo", "NOPE", "--env", "CartPole-v1")
    assert code == 2
    assert "unknown algorithm 'NOPE'" in err and "command line" in err


def test_help_documents_everything(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--stop", "--config", "--storage-path", "--checkpoint-freq", "--restore",
                 "--num-samples", "--algo", "--env", "grid_search", "tensorboard"):
        assert flag in out
