"""Embedding quantization and exact search over the codes (C++ extension ``llmembed_fast._C``).

ranges = calibrate(emb)                                   # [2, D] per-dimension min/max
codes = quantize(emb, "ubinary" | "binary" | "int8" | "uint8", ranges=None)
dist, ids = hamming_topk(query_bits, doc_bits, k)         # exact, ties -> lower index
scores, ids = int8_topk(query_float, doc_int8, ranges, k) # exact inner product with dequantized docs
index = Index(dim, precision="binary", rescore="int8").add(emb); index.search(q, k); index.save(path)
"""

from llmembed_fast.quant.codes import calibrate, dequantize, quantize, unpack_bits
from llmembed_fast.quant.index import Index, IndexFileError
from llmembed_fast.quant.search import hamming_topk, int8_topk

__all__ = [
    "calibrate",
    "quantize",
    "dequantize",
    "unpack_bits",
    "hamming_topk",
    "int8_topk",
    "Index",
    "IndexFileError",
]
