"""YAML -> Tune parameter space: merging, search spaces, coercion."""

import textwrap

import pytest
from ray import tune

from rllib_ext.cli.experiment import deep_merge, experiments_from_file, first_variant


def test_deep_merge_keeps_siblings_and_replaces_leaves():
    base = {"a": 1, "m": {"x": 1, "y": 2}, "s": {"grid_search": [1, 2]}}
    merged = deep_merge(base, {"m": {"y": 3}, "s": {"grid_search": [5]}, "b": 2})
    assert merged == {"a": 1, "m": {"x": 1, "y": 3}, "s": {"grid_search": [5]}, "b": 2}
    assert base["m"]["y"] == 2  # inputs untouched


def test_search_space_markers_become_tune_domains(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent("""
        sweep:
          run: PPO
          env: CartPole-v1
          config:
            lr: {grid_search: [1e-3, 1e-4]}
            gamma: {choice: [0.9, 0.99]}
            entropy_coeff: {uniform: [0.0, 0.01]}
    """))
    [experiment] = experiments_from_file(str(path), config_override={"lambda": 0.9})
    space = experiment.param_space
    assert space["lr"] == tune.grid_search([1e-3, 1e-4])  # YAML "1e-3" strings -> floats
    assert isinstance(space["gamma"], tune.search.sample.Categorical)
    assert isinstance(space["entropy_coeff"], tune.search.sample.Float)
    assert space["lambda"] == 0.9 and space["env"] == "CartPole-v1"


def test_model_config_alias_and_first_variant(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("e:\n  algo: PPO\n  env: CartPole-v1\n  config:\n"
                    "    model_config: {fcnet_hiddens: [8]}\n")
    [experiment] = experiments_from_file(str(path), stop_override={"training_iteration": 3})
    assert experiment.param_space["_model_config"] == {"fcnet_hiddens": [8]}
    assert experiment.stop == {"training_iteration": 3}
    assert first_variant({"a": {"grid_search": [3, 4]}, "b": {"c": {"choice": [7]}}}) == \
        {"a": 3, "b": {"c": 7}}


@pytest.mark.parametrize("algorithm,env", [("VCPO", "MathEnv"), ("TMFPG", "DynamicQueueing")])
def test_algorithms_built_from_python_find_the_project_env_names(algorithm, env):
    """Algorithm.__init__ resolves config.env before setup runs: the project's env names must
    be registered by then (not only when the `rllib` command registered them)."""
    from ray.tune.registry import ENV_CREATOR, _global_registry

    from rllib_ext import registry

    for name in registry.PROJECT_ENVS:
        _global_registry.unregister(ENV_CREATOR, name)
    algorithm_class = registry.get_algorithm_class(algorithm)
    _, creator = algorithm_class._get_env_id_and_creator(env, algorithm_class.get_default_config())
    assert _global_registry.contains(ENV_CREATOR, env)
    assert isinstance(creator({}), registry.import_object(registry.PROJECT_ENVS[env]))
