"""AlgorithmConfig settings shared by every algorithm that samples from an LLM (VCPO, ...)."""

from __future__ import annotations

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided

from rllib_ext.llm.weight_sync import DEFAULT_BUCKET_MB


class LLMRolloutConfig(AlgorithmConfig):
    """An AlgorithmConfig whose env runners are :class:`~rllib_ext.llm.env_runner.LLMEnvRunner`
    generating from ``llm_model`` with a vLLM (or transformers) engine.

    Set the rollout side with :meth:`llm_rollouts`; the environment (e.g. ``"MathEnv"``) and its
    dataset with ``environment(env=..., env_config=...)`` as usual.
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        from rllib_ext.llm.env_runner import LLMEnvRunner

        self.env_runner_cls = LLMEnvRunner
        # `model` is taken by RLlib (the old stack's model dict).
        self.llm_model = "tiny"
        self.generation_backend = "vllm"
        self.num_generations = 8
        self.prompts_per_sample = 8
        self.temperature = 1.0
        self.top_p = 1.0
        self.max_prompt_tokens = 64
        self.max_response_tokens = 8
        self.engine_kwargs = {}
        self.engine_in_process = "auto"
        self.weight_sync_bucket_mb = DEFAULT_BUCKET_MB
        self.eval_temperature = 0.0
        self.eval_top_p = 1.0
        self.eval_split = "test"
        self.eval_num_problems = None

    def llm_rollouts(self, *, llm_model=NotProvided, generation_backend=NotProvided,
                     num_generations=NotProvided, prompts_per_sample=NotProvided,
                     temperature=NotProvided, top_p=NotProvided, max_prompt_tokens=NotProvided,
                     max_response_tokens=NotProvided, engine_kwargs=NotProvided,
                     engine_in_process=NotProvided, weight_sync_bucket_mb=NotProvided,
                     eval_temperature=NotProvided, eval_top_p=NotProvided,
                     eval_split=NotProvided,
                     eval_num_problems=NotProvided) -> LLMRolloutConfig:
        """Rollout settings.

        Args:
            llm_model: "tiny" (the embedded model), a local model directory or a Hugging Face id.
            generation_backend: "vllm" (default) or "transformers" (no vLLM needed; slower).
            num_generations: responses per prompt (the group size n).
            prompts_per_sample: prompts per env-runner ``sample()`` call.
            temperature, top_p: training sampling parameters (the behaviour policy).
            max_prompt_tokens, max_response_tokens: observation/action widths; prompts longer
                than max_prompt_tokens are skipped (counted), responses stop at
                max_response_tokens (counted as truncated).
            engine_kwargs: extra keyword arguments for ``vllm.LLM``.
            engine_in_process: run vLLM's engine core inside the env runner's process (True),
                in processes of its own (False), or "auto" (default): in-process on CPU, where
                the extra engine processes cost more CPU than they save (1.4-1.8x the
                tokens/s on 2 cores, bench/results/rollout_throughput.md), separate on GPUs,
                where they overlap scheduling with the GPU's work.
            weight_sync_bucket_mb: the largest message of a weight sync, in MiB (default
                256): weights travel to the engines in buckets of at most this size, in the
                engine's dtype, whatever the model's size.
            eval_temperature, eval_top_p: evaluation sampling (temperature 0 = greedy).
            eval_split, eval_num_problems: the held-out split and how many of its problems
                (None = all) the accuracy evaluation uses.
        """
        for name, value in list(locals().items()):
            if name != "self" and value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()

        if self.engine_in_process not in ("auto", True, False):
            self._value_error(f"engine_in_process must be 'auto', true or false, got "
                              f"{self.engine_in_process!r}.")
        if self.generation_backend not in ("vllm", "transformers"):
            self._value_error(f"generation_backend must be 'vllm' or 'transformers', got "
                              f"{self.generation_backend!r}.")
        if self.generation_backend == "vllm":
            from rllib_ext.llm.engine_version import UnsupportedVLLMVersion, check_vllm_version

            try:
                check_vllm_version()
            except UnsupportedVLLMVersion as error:
                self._value_error(str(error))
        bucket_mb = self.weight_sync_bucket_mb
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) \
                or not bucket_mb > 0:
            self._value_error(f"weight_sync_bucket_mb must be a number > 0 (MiB per weight-sync "
                              f"message), got {bucket_mb!r}.")
        if self.temperature <= 0:
            self._value_error(f"temperature must be > 0 for training rollouts (the learner "
                              f"scores tokens at the same temperature), got {self.temperature}.")
        if not isinstance(self.prompts_per_sample, int) or self.prompts_per_sample < 1:
            self._value_error(f"prompts_per_sample must be an integer >= 1, got "
                              f"{self.prompts_per_sample!r}.")
        if not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1:
            self._value_error(f"max_prompt_tokens must be an integer >= 1, got "
                              f"{self.max_prompt_tokens!r}.")
        try:
            self.sampling_settings()
        except ValueError as e:
            self._value_error(str(e))

    @property
    def _model_config_auto_includes(self) -> dict:
        # The learner's module scores tokens with the model and temperature the engine samples.
        return super()._model_config_auto_includes | {"model": self.llm_model,
                                                      "temperature": self.temperature}

    def sampling_settings(self):
        from rllib_ext.llm.generation import SamplingSettings

        return SamplingSettings(n=self.num_generations, temperature=self.temperature,
                                top_p=self.top_p, max_tokens=self.max_response_tokens)
