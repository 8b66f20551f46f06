"""Hugging Face ``Trainer`` with gradient caching: contrastive batches larger than fit in memory.

``GradCacheTrainer`` overrides ``compute_loss``: the batch (``{"query": {...}, "doc": {...}}``, dicts of
tensors, ``doc`` possibly a list of columns) is embedded in chunks by :class:`llmembed_fast.GradCache`, the
loss (default ``lf.contrastive_loss``) is computed once on the cached embeddings, and the chunks are re-run
inside the ``backward`` the Trainer calls, so mixed precision, gradient accumulation and the optimizer
work as usual. ``PairCollator`` turns ``{"query": str, "doc": str}`` rows into that batch with the
encoder's tokenizer (e.g. :meth:`llmembed_fast.LLMEmbedder.tokenize`).

The text columns reach the collator whatever ``remove_unused_columns`` says (the Trainer's column removal
follows the model's forward signature, which names none of them), and ``include_num_input_tokens_seen``
counts the tokens of every column of the pair batches.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping

import torch

from llmembed_fast._deps import raise_missing

try:
    from transformers import Trainer
    from transformers.trainer import TRAINING_ARGS_NAME
except ImportError as exc:
    raise_missing(exc, "transformers", "hf", "llmembed_fast.integrations.hf_trainer")

from llmembed_fast import _warn
from llmembed_fast.training.grad_cache import GradCache, synced_module


class PairCollator:
    """Rows ``{"query": str, "doc": str, ...}`` -> ``{"query": tokenized, "doc": tokenized}``.

    ``tokenize(texts, **kwargs)`` returns a dict of tensors (``LLMEmbedder.tokenize`` or a wrapper around a
    tokenizer); ``query_kwargs`` / ``doc_kwargs`` are passed to it (e.g. ``instruction=`` for queries).
    Extra text columns listed in ``negative_keys`` become further document columns (hard negatives).

    With an ``LLMEmbedder``'s ``tokenize``, batches are made on the CPU (the Trainer moves them; CUDA
    tensors from a DataLoader cannot be pinned), and queries / documents get the embedder's named prompts
    as :meth:`~llmembed_fast.LLMEmbedder.encode_queries` / ``encode_documents`` give them ("query";
    "document", "passage" or "corpus"), unless the kwargs set ``instruction`` / ``prompt``: training
    then sees the texts as inference will."""

    def __init__(self, tokenize: Callable, *, query_key: str = "query", doc_key: str = "doc",
                 negative_keys: tuple[str, ...] = (), query_kwargs: dict | None = None,
                 doc_kwargs: dict | None = None):
        if not callable(tokenize):
            raise TypeError("tokenize must be callable (texts -> dict of tensors), "
                            f"got {type(tokenize).__name__}")
        if isinstance(negative_keys, str):
            negative_keys = (negative_keys,)  # one column name, not its characters
        negative_keys = tuple(negative_keys)
        for name, key in (("query_key", query_key), ("doc_key", doc_key),
                          *(("negative_keys", k) for k in negative_keys)):
            if not isinstance(key, str):
                raise TypeError(f"{name} must hold column names (str), got {type(key).__name__}")
        for name, kw in (("query_kwargs", query_kwargs), ("doc_kwargs", doc_kwargs)):
            if kw is not None and not isinstance(kw, Mapping):
                raise TypeError(f"{name} must be a dict of keyword arguments for tokenize, got "
                                f"{type(kw).__name__}")
        self.tokenize, self.query_key, self.doc_key = tokenize, query_key, doc_key
        self.negative_keys = negative_keys
        self.query_kwargs, self.doc_kwargs = dict(query_kwargs or {}), dict(doc_kwargs or {})

    def _kwargs(self, side: str) -> dict:
        kw = dict(self.query_kwargs if side == "query" else self.doc_kwargs)
        from llmembed_fast.embedder.model import _DOC_PROMPT_NAMES, LLMEmbedder

        owner = getattr(self.tokenize, "__self__", None)
        if isinstance(owner, LLMEmbedder):
            kw.setdefault("device", "cpu")
            if "prompt" not in kw and "instruction" not in kw:
                prompt = owner._named_prompt(("query",) if side == "query" else _DOC_PROMPT_NAMES)
                if prompt is not None:
                    kw["prompt"] = prompt
        return kw

    def __call__(self, rows: list[dict]) -> dict:
        for key in (self.query_key, self.doc_key, *self.negative_keys):
            if any(key not in r for r in rows):
                raise ValueError(f"every row needs a {key!r} text")
        q = dict(self.tokenize([r[self.query_key] for r in rows], **self._kwargs("query")))
        doc_kw = self._kwargs("doc")
        docs = [dict(self.tokenize([r[k] for r in rows], **doc_kw))
                for k in (self.doc_key, *self.negative_keys)]
        return {"query": q, "doc": docs[0] if len(docs) == 1 else docs}


def _token_mode(flag) -> str | None:
    """``include_num_input_tokens_seen`` as "all" / "non_padding" / None (off), across transformers versions
    (a bool before 4.55; "all" / "non_padding" / "no" after)."""
    if flag in (None, False, "no"):
        return None
    return "non_padding" if flag == "non_padding" else "all"


def _pair_tokens(inputs, mode: str):
    """Tokens of every column of a ``{"query": ..., "doc": ...}`` batch (``input_ids`` elements, or the
    ``attention_mask`` sum for "non_padding"); None when the batch is not of that form."""
    if not isinstance(inputs, Mapping) or "query" not in inputs or "doc" not in inputs:
        return None
    docs = inputs["doc"] if isinstance(inputs["doc"], (list, tuple)) else [inputs["doc"]]
    total = 0
    for col in (inputs["query"], *docs):
        if not isinstance(col, Mapping) or "input_ids" not in col:
            return None
        mask = col.get("attention_mask") if mode == "non_padding" else None
        total = total + (col["input_ids"].numel() if mask is None else mask.sum())
    return total  # an int, or a tensor (no host sync here: the gather below reads it once)


class _DropTokenWarning(logging.Filter):
    """transformers 4's training loop looks for ``input_ids`` at the top of each batch to count tokens and
    warns every step when it is not there; GradCacheTrainer counts them itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Tried to track the number of tokens seen")


class GradCacheTrainer(Trainer):
    """``Trainer`` whose loss is computed with gradient caching.

    Args (besides ``Trainer``'s):
        loss_fn: ``loss_fn(q, d, **loss_kwargs) -> scalar`` (default ``lf.contrastive_loss``).
        chunk_size: rows embedded at once (``per_device_train_batch_size`` is the contrastive batch).
        chunk_tokens: also cap each chunk at this many attended tokens (see :class:`GradCache`; rows are
            chunked longest first, as ``GradCache(sort_by_length=True)`` does by default). Default None.
        loss_kwargs: keyword arguments for ``loss_fn`` (e.g. ``temperature``, ``matryoshka_dims``).
        encode: ``encode(model, chunk) -> [b, D]`` (default ``model(chunk)``, e.g. an ``LLMEmbedder``).
            The model given to ``compute_loss`` (DDP-wrapped under distributed training) governs the
            gradient synchronization either way (one all-reduce per step).
        grad_multiplier: multiplies every gradient (see :class:`GradCache`). Default None: the size of
            ``loss_kwargs["group"]`` (or of the group a loss module holds, as ``ContrastiveLoss(group=)``)
            when one is given (a global loss under DDP, whose averaging over ranks it undoes), else 1.
    """

    def __init__(self, *args, loss_fn: Callable | None = None, chunk_size: int = 32,
                 loss_kwargs: dict | None = None, encode: Callable | None = None,
                 grad_multiplier: float | None = None, chunk_tokens: int | None = None, **kwargs):
        if encode is not None and not callable(encode):
            raise TypeError(f"encode must be callable (model, chunk) -> embeddings, got "
                            f"{type(encode).__name__}")
        if loss_kwargs is not None and not isinstance(loss_kwargs, Mapping):
            raise TypeError(f"loss_kwargs must be a dict of keyword arguments for loss_fn, got "
                            f"{type(loss_kwargs).__name__}")
        if kwargs.get("compute_loss_func") is not None:
            # compute_loss ignores it, and the Trainer would then take the loss as already scaled for
            # gradient accumulation (not divided by the accumulation steps)
            raise ValueError("GradCacheTrainer computes its loss with loss_fn (on the embeddings): pass "
                             "loss_fn= instead of compute_loss_func=")
        super().__init__(*args, **kwargs)
        if loss_fn is None:
            from llmembed_fast.ops.contrastive import contrastive_loss as loss_fn
        self.gc_loss_fn, self.gc_chunk_size = loss_fn, chunk_size
        self.gc_loss_kwargs = dict(loss_kwargs or {})
        self.gc_encode = encode
        self.gc_grad_multiplier = grad_multiplier
        self.gc_chunk_tokens = chunk_tokens
        learned = [p for p in getattr(loss_fn, "parameters", lambda: [])() if p.requires_grad]
        model_params = {id(p) for p in self.model.parameters()} if self.model is not None else set()
        if any(id(p) not in model_params for p in learned):
            raise ValueError(
                "loss_fn has trainable parameters (e.g. ContrastiveLoss(learn_temperature=True)) that are "
                "not the model's: the Trainer's optimizer, zero_grad and checkpoints would miss them. "
                "Register the loss as a submodule of the model, or use a fixed temperature")
        for name, value in self.gc_loss_kwargs.items():
            if isinstance(value, torch.Tensor) and value.requires_grad and id(value) not in model_params:
                _warn.warn(
                    f"loss_kwargs[{name!r}] requires grad but is not a parameter of the model: only an "
                    "optimizer you pass (optimizers=) updates it, and checkpoints do not hold it. To train "
                    "it with the model, register it on the model (e.g. a ContrastiveLoss("
                    "learn_temperature=True) submodule, passed as loss_fn); else detach it",
                    UserWarning,
                )
        # validates chunk_size, loss_fn and grad_multiplier now, not mid-training
        GradCache(lambda x: x, loss_fn, chunk_size, grad_multiplier=1.0 if grad_multiplier is None
                  else grad_multiplier, chunk_tokens=chunk_tokens)

    def get_decay_parameter_names(self, model) -> list[str]:
        """The Trainer's weight-decay parameters, less the loss's own (a learned temperature registered on
        the model would otherwise decay towards 1)."""
        names = super().get_decay_parameter_names(model)
        own = {id(p) for p in getattr(self.gc_loss_fn, "parameters", lambda: [])()}
        if not own:
            return names
        skip = {n for n, p in model.named_parameters() if id(p) in own}
        return [n for n in names if n not in skip]

    def _remove_unused_columns(self, dataset, description=None):
        """Every column reaches the collator: the Trainer's removal keeps only the names of the model's
        forward arguments, none of which is a text column (a KeyError / empty batch otherwise)."""
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def _add_tokens_seen(self, inputs) -> bool:
        """Adds the pair batch's tokens (all ranks) to ``state.num_input_tokens_seen``; False when the
        batch is not a pair batch of token columns or counting is off."""
        mode = _token_mode(self.args.include_num_input_tokens_seen)
        n = None if mode is None else _pair_tokens(inputs, mode)
        if n is None:
            return False
        n = torch.as_tensor(n, dtype=torch.int64).to(self.args.device)
        self.state.num_input_tokens_seen += self.accelerator.gather(n).sum().item()
        return True

    def _track_num_input_tokens(self, inputs):
        """transformers 5: the Trainer's per-batch token count, for pair batches."""
        if not self._add_tokens_seen(inputs):
            return super()._track_num_input_tokens(inputs)
        return None

    def training_step(self, model, inputs, *args, **kwargs):
        if not hasattr(Trainer, "_track_num_input_tokens"):  # transformers 4 counts inline, before this
            self._add_tokens_seen(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def train(self, *args, **kwargs):
        counting = _token_mode(self.args.include_num_input_tokens_seen) is not None
        quiet = counting and not hasattr(Trainer, "_track_num_input_tokens")
        log = logging.getLogger("transformers.trainer")
        drop = _DropTokenWarning()
        with contextlib.ExitStack() as stack:
            if quiet:
                log.addFilter(drop)
                stack.callback(log.removeFilter, drop)
            return super().train(*args, **kwargs)

    def _gc_grad_multiplier(self) -> float:
        if self.gc_grad_multiplier is not None:
            return float(self.gc_grad_multiplier)
        group = self.gc_loss_kwargs.get("group")
        if group is None:  # a loss module holding its group, e.g. ContrastiveLoss(group=...), or a partial
            for attr in ("kwargs", "keywords"):  # functools.partial(lf.contrastive_loss, group=...)
                held = getattr(self.gc_loss_fn, attr, None)
                if isinstance(held, dict) and held.get("group") is not None:
                    group = held["group"]
                    break
            else:
                group = getattr(self.gc_loss_fn, "group", None)
        if group is None:
            return 1.0
        import torch.distributed as dist

        return float(dist.get_world_size(group)) if dist.is_available() and dist.is_initialized() else 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not isinstance(inputs, dict) or "query" not in inputs or "doc" not in inputs:
            raise ValueError("GradCacheTrainer expects batches {'query': ..., 'doc': ...} (see PairCollator)")
        encoder = model if self.gc_encode is None else (lambda chunk: self.gc_encode(model, chunk))
        sync = synced_module(model)  # DDP / FSDP: one synchronization per step
        gc = GradCache(encoder, self.gc_loss_fn, self.gc_chunk_size, chunk_tokens=self.gc_chunk_tokens,
                       grad_multiplier=self._gc_grad_multiplier(), sync_module=sync)
        loss = gc.forward(inputs["query"], inputs["doc"], **self.gc_loss_kwargs)
        return (loss, {}) if return_outputs else loss

    def _llm_embedder(self, model=None):
        """The model when it is an ``LLMEmbedder`` (unwrapped from DDP / torch.compile), else None."""
        from llmembed_fast.embedder.model import LLMEmbedder

        m = model if model is not None else self.model
        unwrap = self.accelerator.unwrap_model
        if "keep_torch_compile" in inspect.signature(unwrap).parameters:
            m = unwrap(m, keep_torch_compile=False)
        else:  # accelerate before 1.3 (the declared floor is 1.1) keeps the torch.compile wrapper
            m = unwrap(m)
            m = getattr(m, "_orig_mod", m)
        return m if isinstance(m, LLMEmbedder) else None

    def _saved_embedder(self, folder: str | None, model=None):
        """The embedder to load ``folder`` into when it was written by :meth:`_save` (else None: the
        Trainer's own loading applies, e.g. FSDP / DeepSpeed checkpoints)."""
        from llmembed_fast.embedder.model import SETTINGS_FILE

        if not folder or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None
        if not os.path.isfile(os.path.join(folder, SETTINGS_FILE)):
            return None
        return self._llm_embedder(model)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """An ``LLMEmbedder`` is saved with its ``save_pretrained`` (model, tokenizer, settings), so that
        ``LLMEmbedder.from_pretrained(checkpoint)`` loads a checkpoint or ``save_model``'s folder (the
        Trainer's own ``_save`` writes a bare state dict for modules that are not a ``PreTrainedModel``)."""
        embedder = self._llm_embedder()
        if embedder is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        embedder.save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        embedder = self._saved_embedder(resume_from_checkpoint, model)
        if embedder is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        embedder.load_weights(resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        embedder = self._saved_embedder(self.state.best_model_checkpoint)
        if embedder is None:
            return super()._load_best_model()
        embedder.load_weights(self.state.best_model_checkpoint)
        return None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss on the batch, embedded in chunks without a graph (no predictions).
        ``Trainer``'s own step would call ``model(**inputs)``, which a contrastive batch is not."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
