"""TRL's GRPOTrainer as the synchronous peer of bench/vcpo_vs_sync_loop.py.

``GRPOTrainer`` (TRL 1.16, ``pip install -e ".[bench]"``) trains the demo's model on the demo's
task with the demo's settings: 16 prompts x 8 samples per update (``num_generations=8``,
``per_device_train_batch_size=128``, one update per generation, on-policy), <= 6 tokens at
temperature 1 with ``transformers.generate``, lr 1e-4 (constant), weight decay 0, gradient
clipping 1.0, no KL term, answers graded by the task's own checker. TRL's other settings keep
their defaults, as a TRL user has them.

``trainer.train()`` runs in a background thread that waits before every update for the bench
to release it, so the bench can run it in blocks, interleaved with the other contenders.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings

# How long a released block may take before the bench gives up on the trainer (seconds).
BLOCK_TIMEOUT_S = 600


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


class TRLGRPOPeer:
    """``GRPOTrainer`` for ``total_updates`` updates, run block by block (:meth:`run_block`)."""

    def __init__(self, config, total_updates: int):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

        with warnings.catch_warnings():  # TRL warns about the installed vLLM, which it never uses here
            warnings.simplefilter("ignore", UserWarning)
            from trl import GRPOConfig, GRPOTrainer

        from envs.math.env import MathEnv
        from rllib_ext.llm.tiny import resolve_model

        path = resolve_model(config.llm_model)
        self.env = env = MathEnv({**config.env_config, "tokenizer": path,
                                  "max_prompt_tokens": config.max_prompt_tokens})
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompts = env.next_prompts(config.prompts_per_sample * total_updates)
        # TRL tokenizes text prompts with the tokenizer's special tokens, as MathEnv does.
        rows = [{"prompt": tokenizer.decode(p.token_ids, skip_special_tokens=True),
                 "answer": str(p.row["answer"])} for p in prompts]

        def math_answer(prompts, completions, answer, **columns):
            return [grade.reward for grade in env.checker.grade_many(list(completions),
                                                                       list(answer))]

        args = GRPOConfig(
            output_dir="/tmp/rllib_ext_trl_peer", use_cpu=True, seed=0,
            num_generations=config.num_generations,
            per_device_train_batch_size=config.prompts_per_sample * config.num_generations,
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
            max_completion_length=config.max_response_tokens, temperature=config.temperature,
            learning_rate=config.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=config.weight_decay, max_grad_norm=config.grad_clip, beta=0.0,
            max_steps=total_updates, shuffle_dataset=False, dataloader_num_workers=0,
            logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True)
        self._permits = threading.Semaphore(0)
        self._finished: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._threads = [1]  # torch threads of the block being run
        permits, finished, threads = self._permits, self._finished, self._threads

        class Gate(TrainerCallback):
            """Each update waits for a permit and runs with the block's torch threads; its CPU
            seconds (this thread) are reported."""

            def on_step_begin(self, args, state, control, **kwargs):
                import torch

                permits.acquire()
                if torch.get_num_threads() != threads[0]:
                    torch.set_num_threads(threads[0])
                self.started = time.thread_time()

            def on_step_end(self, args, state, control, **kwargs):
                finished.put(time.thread_time() - self.started)

        self.trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[math_answer],
            args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            callbacks=[Gate()])
        self._thread = threading.Thread(target=self._train, daemon=True)
        self._thread.start()

    def _train(self):
        try:
            self.trainer.train()
        except BaseException as error:  # reported by run_block
            self._error = error
            self._finished.put(None)

    @property
    def grading_pid(self) -> int | None:
        return self.env.checker.worker_pid

    def run_block(self, updates: int, threads: int) -> dict:
        """Release ``updates`` updates, run with ``threads`` torch threads (set in the trainer's
        thread: a thread's setting is its own), and wait for them: wall seconds and the
        trainer thread's CPU seconds (generation, rewards call, loss, backward, optimiser)."""
        self._threads[0] = threads
        started = time.perf_counter()
        for _ in range(updates):
            self._permits.release()
        cpu = 0.0
        for _ in range(updates):
            try:
                spent = self._finished.get(timeout=BLOCK_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"TRL's GRPOTrainer did not finish an update within "
                                   f"{BLOCK_TIMEOUT_S} s") from None
            if spent is None:
                raise RuntimeError(f"TRL's GRPOTrainer failed: {self._error!r}") \
                    from self._error
            cpu += spent
        return {"seconds": time.perf_counter() - started, "cpu_trainer_s": cpu}
