"""An example reward function for `reward_funcs` (see tuned_examples/vcpo_custom_reward.yaml).

Reward functions follow TRL's convention: ``f(prompts, completions, **columns)`` returns one
number per completion (or None where it does not apply). ``prompts[i]`` is the prompt of
``completions[i]`` (text, or a list of chat messages), and every other column of the dataset
rows arrives as a keyword argument with one value per completion.
"""


def no_extra_characters(prompts, completions, answer, **columns):
    """1.0 when the completion is no longer than the gold answer (no trailing text), else 0.0.

    Uses the ``answer`` column of examples/data/sums.jsonl; ``columns`` takes the others
    (here ``uid``)."""
    return [1.0 if len(completion.strip()) <= len(gold) else 0.0
            for completion, gold in zip(completions, answer, strict=True)]
