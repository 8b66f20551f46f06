"""Benchmarks behind ``llmembed-fast bench``: each fast path timed side by side with the baseline a user
would otherwise run, on whatever hardware is present.

Case providers are the modules ``llmembed_fast/bench/cases_*.py``; each defines
``cases(ctx: BenchContext) -> list[Case]``. Missing optional baselines are skipped with a note.
"""

from llmembed_fast.bench.core import BenchContext, Case, run_cases

__all__ = ["BenchContext", "Case", "run_cases"]
