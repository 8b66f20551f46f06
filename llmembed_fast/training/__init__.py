"""Training utilities: gradient caching (:class:`GradCache`) for large contrastive batches."""
from llmembed_fast.training.chunking import batch_size, chunk_ranges, slice_batch
from llmembed_fast.training.grad_cache import GradCache
from llmembed_fast.training.rng import RngState

__all__ = ["GradCache", "RngState", "batch_size", "chunk_ranges", "slice_batch"]
