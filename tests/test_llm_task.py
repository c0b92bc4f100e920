"""The LLM task seam without an engine: reward functions (TRL's convention), MathEnv as a Task
(rows, prompts, chat template, scores), the rollout statistics and TensorBoard tags."""

import json
import math
import shutil

import numpy as np
import pytest

from envs.math.env import MathEnv
from rllib_ext.cli.loggers import tensorboard_tag
from rllib_ext.llm.env_runner import completions_table, rollout_statistics
from rllib_ext.llm.rewards import (
    RewardFunction,
    RewardFunctionError,
    check_columns,
    load_reward_functions,
    weighted_rewards,
)
from rllib_ext.llm.task import Scores, Task


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def answer_in_completion(prompts, completions, answer, **columns):
    """None where the row has no answer: the function does not apply there."""
    return [None if a is None else float(a in c) for c, a in zip(completions, answer)]


def broken(prompts, completions, **columns):
    return [1.0]


def not_finite(prompts, completions, **columns):
    return [math.nan] * len(completions)


def reward(function, weight=1.0):
    return RewardFunction(function.__name__, f"tests.test_llm_task:{function.__name__}",
                          function, weight)


def test_weighted_rewards_sum_the_functions_that_apply():
    rows = [{"prompt": "p1", "answer": "4"}, {"prompt": "p2", "answer": None},
            {"prompt": "p3", "answer": "7"}]
    completions = ["4", "12", "no"]
    totals, per_function = weighted_rewards(
        [reward(length_reward, 0.5), reward(answer_in_completion, 2.0)], rows, completions)
    assert per_function == {"length_reward": [1.0, 2.0, 2.0],
                            "answer_in_completion": [1.0, None, 0.0]}
    assert totals == [0.5 * 1 + 2 * 1, 0.5 * 2, 0.5 * 2 + 2 * 0]
    # values computed elsewhere (the math reward inside MathEnv) are not computed again
    totals, _ = weighted_rewards([reward(broken)], rows, completions, given={"broken": [1, 0, 1]})
    assert totals == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("function, message", [
    (broken, "returned 1 values for 3 completions; return a list with one number per"),
    (not_finite, "returned nan; return finite numbers"),
])
def test_unusable_reward_values_are_refused(function, message):
    with pytest.raises(RewardFunctionError, match=message):
        weighted_rewards([reward(function)], [{"prompt": "p"}] * 3, ["a", "b", "c"])


def test_reward_functions_load_by_path_and_check_their_columns():
    functions = load_reward_functions(["tests.test_llm_task:length_reward",
                                       "tests.test_llm_task:length_reward",
                                       "envs.math.rewards:math_answer"], [1, 2, 3])
    assert [(f.name, f.weight) for f in functions] == [
        ("length_reward", 1.0), ("length_reward_2", 2.0), ("math_answer", 3.0)]
    check_columns(functions, ["answer", "uid"])
    with pytest.raises(RewardFunctionError, match=r"math_answer needs the column\(s\) "
                                                  r"\['answer'\].*answer_field"):
        check_columns(functions, ["uid"])
    for paths, weights, message in [
            (["nope"], None, "is not of the form 'package.module:function'"),
            (["no_such_module:f"], None, "cannot import module 'no_such_module'"),
            (["tests.test_llm_task:nope"], None, "has no function 'nope'"),
            (["tests.test_llm_task:length_reward"], [1, 2], "give a list of 1 finite numbers"),
            ([], None, "give a non-empty list")]:
        with pytest.raises(RewardFunctionError, match=message):
            load_reward_functions(paths, weights)


@pytest.fixture
def sums(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a),
                                        "level": a % 2}) + "\n" for a in range(20)))
    return str(path)


def test_math_env_is_a_task_with_two_reward_functions(sums, tiny_model_path):
    env = MathEnv({"dataset": {"path": sums}, "tokenizer": tiny_model_path,
                   "reward_funcs": ["envs.math.rewards:math_answer",
                                    "tests.test_llm_task:length_reward"],
                   "reward_weights": [1.0, 0.1], "answer_style": "plain", "shuffle": False})
    assert isinstance(env, Task) and len(env.prompts) == 20
    first = env.prompts[0]
    assert first.row == {"uid": "rows/train/0", "prompt": "0+0=", "answer": "0", "level": 0}
    assert env.decode(first.token_ids) == "0+0="  # the tokenizer round trip
    prompts = env.next_prompts(3)
    assert [p.row["prompt"] for p in prompts] == ["0+0=", "1+1=", "2+2="]
    scores = env.score(prompts, ["0", "3", "4x"])
    assert scores.per_function == {"math_answer": [1.0, 0.0, 0.0],
                                   "length_reward": [1.0, 1.0, 2.0]}
    assert np.allclose(scores.rewards, [1.1, 0.1, 0.2])
    assert scores.correct == [True, False, False]
    assert scores.counts == {"no_answer": 0, "checker_timeouts": 0, "checker_errors": 0}
    assert scores.infos[2]["extracted"] == "4x" and not scores.infos[0]["empty"]
    env.close()


def test_without_the_math_reward_there_is_no_accuracy(sums, tiny_model_path):
    env = MathEnv({"dataset": {"path": sums}, "tokenizer": tiny_model_path,
                   "reward_funcs": "tests.test_llm_task:length_reward"})
    scores = env.score(env.prompts[:2], ["1", "22"])
    assert scores.correct is None and scores.rewards == [1.0, 2.0] and env.checker is None


def test_prompt_template_uses_row_columns(sums, tiny_model_path):
    env = MathEnv({"dataset": {"path": sums}, "tokenizer": tiny_model_path,
                   "prompt_template": "L{level} {prompt}", "shuffle": False})
    assert env.decode(env.prompts[1].token_ids) == "L1 1+1="


def test_chat_rows_and_system_prompt_use_the_tokenizer_chat_template(tmp_path, tiny_model_path):
    from transformers import AutoTokenizer

    conversation = [{"role": "user", "content": "2+2="}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conversation, "answer": "4"}) + "\n")
    with pytest.raises(ValueError, match="has no chat template"):
        MathEnv({"dataset": {"path": str(data)}, "tokenizer": tiny_model_path})
    chat_model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_path, chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    tokenizer.save_pretrained(chat_model)
    env = MathEnv({"dataset": {"path": str(data)}, "tokenizer": str(chat_model),
                   "system_prompt": "Be brief."})
    assert env.decode(env.prompts[0].token_ids) == "s:Be brief.\nu:2+2=\na:"
    text = MathEnv({"dataset": {"name": "arithmetic", "limit": 1}, "tokenizer": str(chat_model),
                    "use_chat_template": True, "shuffle": False})
    assert text.decode(text.prompts[0].token_ids).startswith("u:") and \
        text.decode(text.prompts[0].token_ids).endswith("=\na:")


def test_rollout_statistics_against_brute_force():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=(6, 4)).astype(float)
    rewards[2] = 1.0  # one group with one reward for all samples
    stats = rollout_statistics(rewards.reshape(-1), 4, [1, 2, 3] * 8)
    assert stats["episode_return_mean"] == rewards.mean()
    assert np.isclose(stats["reward_std"], np.mean([np.std(g) for g in rewards]))
    assert stats["fraction_groups_one_reward"] == np.mean([len(set(g)) == 1 for g in rewards])
    assert stats["response_length_mean"] == 2.0


def test_completions_table_is_markdown_with_one_column_per_reward(sums, tiny_model_path):
    env = MathEnv({"dataset": {"path": sums}, "tokenizer": tiny_model_path, "shuffle": False})
    scores = Scores([1.0, 0.0], {"math_answer": [1.0, None]})
    table = completions_table(env.prompts[:2], ["0", "a|b\nc"], scores, 2)
    assert table.splitlines() == ["| prompt | completion | reward | math_answer |",
                                  "|---|---|---|---|",
                                  "| 0+0= | 0 | 1 | 1 |",
                                  "| 1+1= | a\\|b\\nc | 0 | - |"]


@pytest.mark.parametrize("path, tag", [
    ("env_runners/accuracy", "env_runners/accuracy"),
    ("learners/default_policy/ess_ratio", "learners/default_policy/ess_ratio"),
    ("vcpo/samples_per_s", "vcpo/samples_per_s"),
    ("timers/training_step", "plumbing/timers/training_step"),
    ("learners/default_policy/num_module_steps_trained",
     "plumbing/learners/default_policy/num_module_steps_trained"),
    ("learners/__all_modules__/num_env_steps_trained_lifetime_throughput/throughput_since_"
     "last_reduce", "plumbing/learners/__all_modules__/num_env_steps_trained_lifetime_"
     "throughput/throughput_since_last_reduce"),
    ("env_runners/weights_seq_no", "plumbing/env_runners/weights_seq_no"),
    ("num_env_steps_sampled_lifetime", "plumbing/num_env_steps_sampled_lifetime"),
])
def test_tensorboard_tags_put_bookkeeping_under_one_prefix(path, tag):
    assert tensorboard_tag(path) == tag
