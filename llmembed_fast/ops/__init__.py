"""Autograd Functions, argument checks and backend dispatch of every op."""
from llmembed_fast.ops.pooling import POOLING_MODES, l2_normalize, matryoshka, pool, pool_segments

__all__ = ["POOLING_MODES", "pool", "pool_segments", "l2_normalize", "matryoshka"]
