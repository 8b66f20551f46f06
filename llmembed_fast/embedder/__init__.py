"""The Hugging Face model wrapper: prompts, tokenization rules, token-budget batching, the fused head.

``LLMEmbedder.from_pretrained(path)`` / ``LLMEmbedder(model, tokenizer)``; see :mod:`.model`.
"""

from llmembed_fast.embedder.args import PRECISIONS, resolve_pooling
from llmembed_fast.embedder.model import LLMEmbedder
from llmembed_fast.embedder.prompts import PROMPT_STYLES, PromptStyle

__all__ = ["LLMEmbedder", "PromptStyle", "PROMPT_STYLES", "PRECISIONS", "resolve_pooling"]
