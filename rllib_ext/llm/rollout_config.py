"""AlgorithmConfig settings shared by every algorithm that samples from an LLM (VCPO, ...)."""

from __future__ import annotations

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided

from rllib_ext.llm.placement import DEFAULT_SHARED_ENGINE_MEMORY
from rllib_ext.llm.weight_sync import DEFAULT_BUCKET_MB

WEIGHT_SYNC_ROUTES = ("buckets", "cuda_ipc", "nccl")


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
        self.weight_sync_route = "buckets"
        self.gpu_layout = "cpu"
        self.shared_gpu_engine_memory = DEFAULT_SHARED_ENGINE_MEMORY
        self.eval_temperature = 0.0
        self.eval_top_p = 1.0
        self.eval_split = "test"
        self.eval_num_problems = None
        self.completions_table_rows = 8
        self.completions_table_interval = 10

    def llm_rollouts(self, *, llm_model=NotProvided, generation_backend=NotProvided,
                     num_generations=NotProvided, prompts_per_sample=NotProvided,
                     temperature=NotProvided, top_p=NotProvided, max_prompt_tokens=NotProvided,
                     max_response_tokens=NotProvided, engine_kwargs=NotProvided,
                     engine_in_process=NotProvided, weight_sync_bucket_mb=NotProvided,
                     weight_sync_route=NotProvided, gpu_layout=NotProvided,
                     shared_gpu_engine_memory=NotProvided,
                     eval_temperature=NotProvided, eval_top_p=NotProvided,
                     eval_split=NotProvided, eval_num_problems=NotProvided,
                     completions_table_rows=NotProvided,
                     completions_table_interval=NotProvided) -> LLMRolloutConfig:
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
            weight_sync_route: "buckets" (default: through Ray's object store and the engine's
                RPC, everywhere), "cuda_ipc" (engine and learner on one GPU) or "nccl"
                (engine and learner on GPUs of their own), the last two through vLLM's
                weight-transfer API, NOT measured (no GPU here); where a GPU route cannot
                start, the run logs why and uses the buckets.
            gpu_layout: "cpu" (default), "separate" (each engine and the learner on a GPU of
                its own), "shared" (engines and learner on one GPU, fixed memory split) or
                "auto" (separate if enough GPUs are visible, else shared); sets
                num_gpus_per_env_runner / num_gpus_per_learner (see
                ``rllib_ext.llm.placement``).
            shared_gpu_engine_memory: in the shared layout, the fraction of the GPU's memory
                the engines take (default 0.4; the learner gets the rest).
            eval_temperature, eval_top_p: evaluation sampling (temperature 0 = greedy).
            eval_split, eval_num_problems: the held-out split and how many of its problems
                (None = all) the accuracy evaluation uses.
            completions_table_rows, completions_table_interval: a table of that many sampled
                completions (prompt, completion, rewards) goes to TensorBoard as text every
                that many iterations (0 rows = none).
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
        self._place_on_gpus()
        if self.weight_sync_route not in WEIGHT_SYNC_ROUTES:
            self._value_error(f"weight_sync_route must be one of {WEIGHT_SYNC_ROUTES}, got "
                              f"{self.weight_sync_route!r}.")
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
        for name in ("completions_table_rows", "completions_table_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self._value_error(f"{name} must be an integer >= 0, got {value!r}.")
        if not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1:
            self._value_error(f"max_prompt_tokens must be an integer >= 1, got "
                              f"{self.max_prompt_tokens!r}.")
        try:
            self.sampling_settings()
        except ValueError as e:
            self._value_error(str(e))

    def _place_on_gpus(self) -> None:
        """Resolve ``gpu_layout`` into the GPU counts of the env runners and the learner
        (also inside a trial: the same visible GPUs give the same answer) and refuse a GPU
        request that the visible GPUs cannot meet."""
        from rllib_ext.llm.placement import PlacementError, plan_placement, visible_gpus

        visible = visible_gpus()
        try:
            placement = plan_placement(self.gpu_layout, visible=visible,
                                       num_env_runners=self.num_env_runners,
                                       shared_engine_memory=self.shared_gpu_engine_memory)
        except PlacementError as error:
            self._value_error(str(error))
        if placement.layout != "cpu":
            for name, value in (("num_gpus_per_env_runner", placement.gpus_per_env_runner),
                                ("num_gpus_per_learner", placement.gpus_per_learner)):
                if getattr(self, name) not in (0, value):
                    self._value_error(
                        f"{name}={getattr(self, name)} conflicts with gpu_layout "
                        f"'{self.gpu_layout}', which sets it to {value}. Fix: remove {name} "
                        "(the layout places the engines and the learner).")
                setattr(self, name, value)
            if placement.engine_memory_fraction is not None:
                # The layout owns the memory split (shared_gpu_engine_memory).
                self.engine_kwargs = {**(self.engine_kwargs or {}),
                                      "gpu_memory_utilization":
                                          placement.engine_memory_fraction}
        requested = (self.num_gpus_per_env_runner * max(1, self.num_env_runners)
                     + self.num_gpus_per_learner * max(1, self.num_learners))
        if requested > visible:
            self._value_error(
                f"this config asks for {requested:g} GPU(s) (num_gpus_per_env_runner / "
                f"num_gpus_per_learner) but " + (
                    "no CUDA device is visible. Fix: run it on a GPU machine (make venv-gpu), "
                    "or on CPU use tuned_examples/vcpo_math_tiny.yaml." if visible == 0 else
                    f"only {visible} are visible: Ray would wait for the rest forever. Fix: "
                    "gpu_layout: auto (or shared on one GPU, "
                    "tuned_examples/vcpo_math_1gpu.yaml)."))

    @property
    def _model_config_auto_includes(self) -> dict:
        # The learner's module scores tokens with the model and temperature the engine samples.
        return super()._model_config_auto_includes | {"model": self.llm_model,
                                                      "temperature": self.temperature}

    def sampling_settings(self):
        from rllib_ext.llm.generation import SamplingSettings

        return SamplingSettings(n=self.num_generations, temperature=self.temperature,
                                top_p=self.top_p, max_tokens=self.max_response_tokens)
