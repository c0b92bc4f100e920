"""Where a vLLM decode step goes on this CPU: cProfile of one generation call of the
generation-heavy workload (bench/generation_model.py's 22M Llama, 128 sequences of 64 tokens,
in-process engine), the most expensive operations by own time.

    .venv/bin/python bench/profile_vllm_step.py [--quick]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from generation_model import build_generation_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 sequences of 16 tokens")
    args = parser.parse_args(argv)
    from rllib_ext.llm.generation import SamplingSettings, make_backend
    from rllib_ext.llm.tiny import cache_root

    prompts, tokens = (2, 16) if args.quick else (16, 64)
    backend = make_backend("vllm", str(build_generation_model(cache_root() / "models")),
                           max_model_len=16 + tokens)
    batch = [[1, 6 + i % 10, 11, 7 + i % 7, 13] for i in range(prompts)]
    sampling = SamplingSettings(n=8, temperature=1.0, max_tokens=tokens, min_tokens=tokens)
    backend.generate(batch, sampling)  # warm-up
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    backend.generate(batch, sampling)
    profile.disable()
    seconds = time.perf_counter() - started
    print(f"{len(batch) * 8} sequences x {tokens} tokens: {seconds:.2f} s "
          f"({seconds / tokens * 1000:.0f} ms per decode step, profiled)")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
