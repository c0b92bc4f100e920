"""Column names of the LLM task seam, in one place.

Dataset rows (what a :class:`~rllib_ext.llm.task.Task` hands out with each prompt, and what
reward functions receive as keyword arguments, one list per column):
"""

UID = "uid"  # stable id of a row: "<dataset>/<split>/<index in the source>"
PROMPT = "prompt"  # the prompt: text, or a chat conversation [{"role": ..., "content": ...}]
MESSAGES = "messages"  # chat datasets may name their conversation column so
ANSWER = "answer"  # the gold answer, where the data has one (the math reward reads it)

# Episodes built by the LLM env runner: extra model outputs of the single step.
BEHAVIOUR_LOGP = "behaviour_logp"  # [R] per-token log-probs of the sampling distribution
RESPONSE_LENGTH = "response_length"  # real tokens in the (padded) response
PROMPT_LENGTH = "prompt_length"  # real tokens in the (padded) prompt
GROUP_ID = "group_id"  # the prompt's group: the n responses to one prompt share it
TRUNCATED_RESPONSE = "truncated_response"  # 1 if the response hit max_response_tokens
