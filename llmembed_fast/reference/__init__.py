"""Plain-torch references of every op: the test oracle (clear code, float64-capable, autograd-able)
and, in ``*_chunked`` modules, the CPU backend (memory-bounded implementations of the kernel launchers)."""

from llmembed_fast.reference.pooling import l2_normalize, matryoshka, pool, pool_segments, pooling_weights

__all__ = ["pool", "pool_segments", "pooling_weights", "l2_normalize", "matryoshka"]
