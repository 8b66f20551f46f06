"""Tiny random Hugging Face models and an in-process trained tokenizer, saved to a folder (no downloads).

Shared test helper (the embedder tests, GradCache tests, ...)::

    path = make_tiny_model(tmp_path, "qwen2")          # folder with config, weights and tokenizer
    model, tok = load_tiny_model("llama")              # in memory, cached per process

Architectures: ``qwen2``, ``llama``, ``mistral``, ``gpt2`` (decoders) and ``bert`` (encoder). Each gets a
byte-level BPE tokenizer trained here on a fixed synthetic corpus, with the special-token behaviour of its
family: Qwen2 and GPT-2 add nothing (pad = eos for Qwen2), Llama and Mistral add BOS (``add_eos=True`` makes
the tokenizer append EOS itself, like e5-mistral's), BERT wraps in [CLS] ... [SEP].
"""

from __future__ import annotations

import functools
import os
import random
import tempfile

import torch

ARCHS = ("qwen2", "llama", "mistral", "gpt2", "bert")
SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>", "[CLS]", "[SEP]", "[MASK]", "<unk>"]
_WORDS = (
    "the a an of to in is was for on with as by at from it this that be are or not have has which one "
    "all their there can more about will would been some what when who how than into time only new "
    "query passage instruct represent sentence document retrieve relevant means word thinking step "
    "rewrite rewritten essence captured subjects actions descriptive terms details mind cat dog river "
    "bank money finance water tree house city music paper model embedding vector search fast slow "
    "hello world python torch kernel memory token pooling attention layer weight train test data"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Synthetic sentences over a fixed small vocabulary (with punctuation, digits and a few quotes)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 24))]
        s = " ".join(words)
        r = rng.random()
        if r < 0.2:
            s = s.capitalize() + "."
        elif r < 0.3:
            s = f'"{s}" {rng.randint(0, 99)}'
        elif r < 0.4:
            s = s + ":\n" + rng.choice(_WORDS)
        out.append(s)
    return out


@functools.cache
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    extra = [
        'This sentence : "x" means in one word:"',
        "Instruct: x\nQuery: y",
        "Rewrite the sentence: x",
        "Rewritten sentence: y",
        "After thinking step by step , this sentence :",
        "query: ",
        "passage: ",
    ]
    tok.train_from_iterator(corpus(2000) + extra * 5, trainer=trainer)
    return tok.to_str()


def make_tokenizer(style: str = "qwen2", *, add_eos: bool = False, padding_side: str = "right"):
    """A fast tokenizer (``PreTrainedTokenizerFast``) with the special-token behaviour of ``style``."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    tid = tok.token_to_id
    kw: dict = {}
    if style in ("qwen2", "gpt2"):
        single = "$A <|endoftext|>" if add_eos else "$A"
        kw = dict(eos_token="<|endoftext|>", bos_token=None if style == "qwen2" else "<|endoftext|>")
        if style == "qwen2":
            kw["pad_token"] = "<|endoftext|>"  # pad == eos, as in Qwen2
        specials = [("<|endoftext|>", tid("<|endoftext|>"))]
    elif style in ("llama", "mistral"):
        single = "<s> $A </s>" if add_eos else "<s> $A"
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        specials = [("<s>", tid("<s>")), ("</s>", tid("</s>"))]
    elif style == "bert":
        single = "[CLS] $A [SEP]"
        kw = dict(
            cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>", mask_token="[MASK]", unk_token="<unk>"
        )
        specials = [("[CLS]", tid("[CLS]")), ("[SEP]", tid("[SEP]"))]
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=single, special_tokens=specials),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side=padding_side, model_max_length=512, **kw
    )


def make_config(arch: str, vocab_size: int, **overrides):
    """A tiny config: hidden 64, 2 layers, 4 heads (2 KV heads for GQA models), 512 positions."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    if arch == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif arch == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "bert":
        cfg = tf.BertConfig(**common)
    else:
        raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _style(arch: str) -> str:
    return {"qwen2": "qwen2", "gpt2": "gpt2", "llama": "llama", "mistral": "mistral", "bert": "bert"}[arch]


def build_tiny_model(
    arch: str = "qwen2",
    *,
    seed: int = 0,
    add_eos: bool = False,
    attn_implementation="sdpa",
    **config_overrides,
):
    """(AutoModel without LM head, tokenizer), random init with ``seed``, float32, eval mode."""
    from transformers import AutoModel

    tok = make_tokenizer(_style(arch), add_eos=add_eos)
    cfg = make_config(arch, len(tok), **config_overrides)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        tid = getattr(tok, name, None)
        if tid is not None:
            setattr(cfg, name, tid)
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg, attn_implementation=attn_implementation)
    # Larger-than-default init so that the tiny model's token states depend visibly on context.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval(), tok


def make_tiny_model(
    root,
    arch: str = "qwen2",
    *,
    seed: int = 0,
    add_eos: bool = False,
    name: str | None = None,
    **config_overrides,
) -> str:
    """Save a tiny model + tokenizer under ``root/name`` (default ``tiny-<arch>``) and return the path."""
    path = os.path.join(str(root), name or f"tiny-{arch}{'-eos' if add_eos else ''}-{seed}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    model, tok = build_tiny_model(arch, seed=seed, add_eos=add_eos, **config_overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@functools.cache
def cached_tiny_model_dir(arch: str = "qwen2", seed: int = 0, add_eos: bool = False) -> str:
    """Like :func:`make_tiny_model`, in one per-process temporary folder (reused across tests)."""
    return make_tiny_model(_session_dir(), arch, seed=seed, add_eos=add_eos)


@functools.cache
def _session_dir() -> str:
    return tempfile.mkdtemp(prefix="llmembed-tiny-")


def make_st_model(
    model_dir: str,
    pooling_mode: str = "lasttoken",
    *,
    normalize: bool = True,
    prompts=None,
    include_prompt: bool = True,
    max_seq_length: int | None = None,
    save_to: str | None = None,
):
    """A sentence-transformers model over ``model_dir`` (Transformer -> Pooling -> [Normalize]).

    Saved to ``save_to`` when given (a folder ``LLMEmbedder.from_pretrained`` reads). Returns the model."""
    from sentence_transformers import SentenceTransformer
    from st_compat import embedding_dimension, st_normalize, st_pooling, st_transformer

    Normalize, Pooling, Transformer = st_normalize(), st_pooling(), st_transformer()
    tr = Transformer(model_dir, max_seq_length=max_seq_length)
    if tr.tokenizer.pad_token is None:  # Llama-style tokenizers have none; users set pad = eos
        tr.tokenizer.pad_token = tr.tokenizer.eos_token
    mods = [
        tr,
        Pooling(embedding_dimension(tr), pooling_mode=pooling_mode, include_prompt=include_prompt),
    ]
    if normalize:
        mods.append(Normalize())
    st = SentenceTransformer(modules=mods, prompts=prompts or {}, device="cpu")
    if save_to is not None:
        st.save(save_to)
    return st


def make_qwen3_embedding_tokenizer(padding_side: str = "left"):
    """A fast tokenizer with Qwen3-Embedding's layout: it appends ``<|endoftext|>`` (its pad token) itself,
    while its ``eos_token`` is another token (``<|im_end|>`` there, ``</s>`` here)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eot)]),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<|endoftext|>",
        padding_side=padding_side,
        model_max_length=512,
    )
