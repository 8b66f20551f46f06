"""LLMEmbedder: a Hugging Face model (decoder or encoder) + tokenizer -> text embeddings (fused head)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from llmembed_fast import _deps, _poison, _warn
from llmembed_fast.embedder import adapters, batching, st_names
from llmembed_fast.embedder import packed as packed_mod
from llmembed_fast.embedder.args import (
    QUANTIZED,
    check_bool,
    check_default_prompt_name,
    check_device,
    check_output_args,
    check_positive,
    check_prompts,
    check_text,
    check_texts,
    resolve_dtype,
    resolve_pooling,
)
from llmembed_fast.embedder.hf_model import (
    causal_attention,
    dtype_kwarg,
    encoder_module,
    is_decoder_model,
    last_hidden,
    max_positions,
    output_width,
    position_offset,
    rope_switch_positions,
    rotary_positions,
)
from llmembed_fast.embedder.prompts import TEXT, PromptStyle, check_template, compose, get_style
from llmembed_fast.embedder.st_folder import read_st_folder
from llmembed_fast.embedder.tokenize import Tokenized, probe_tokenizer, tokenize_texts
from llmembed_fast.ops.pooling import l2_normalize, matryoshka, pool, pool_segments

logger = logging.getLogger(__name__)

# int8/uint8 calibrated on fewer encoded rows than this warn (as sentence-transformers' quantize_embeddings)
MIN_CALIBRATION_ROWS = 100
_DOC_PROMPT_NAMES = ("document", "passage", "corpus")


SETTINGS_FILE = "llmembed_fast.json"  # what save_pretrained writes beside the model and tokenizer
# tensors of modules registered on the embedder beside its model (e.g. a loss with a learned temperature)
EXTRA_FILE = "llmembed_fast_extra.safetensors"
_SETTINGS = ("pooling", "normalize", "dims", "max_length", "padding_side", "add_eos", "include_prompt",
             "instruction_template", "truncate_dim", "similarity_fn_name")


def _read_settings(folder: str, what: str = "path_or_id") -> dict | None:
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: unreadable {SETTINGS_FILE} in {folder!r}: {exc}") from None
    if not isinstance(saved, dict) or saved.get("format") != 1:
        raise ValueError(f"{what}: {SETTINGS_FILE} in {folder!r} is not an llmembed_fast settings file")
    return saved


def _holds_adapter(folder: str, saved: dict | None) -> bool:
    """Whether the folder's model is a PEFT adapter: as its settings (``saved``, from ``_read_settings``) say
    (``save_pretrained`` over an earlier save leaves the other kind's files), else when it has an adapter
    config and no config.json."""
    if saved is not None and "adapter" in saved:
        return bool(saved["adapter"])
    return adapters.is_adapter_folder(folder) and not os.path.isfile(os.path.join(folder, "config.json"))


def _finish(emb: torch.Tensor, dims, normalize: bool) -> torch.Tensor:
    """Matryoshka slice and L2 normalization of float32 embeddings [B, H] (what ``pool`` fuses)."""
    if dims is not None:
        return matryoshka(emb, dims, normalize=normalize)
    return l2_normalize(emb) if normalize else emb


class LLMEmbedder(nn.Module):
    """Text embeddings from a Hugging Face model with the right prompt, truncation, EOS and pooling.

    ``encode`` (no grad, token-budget batches sorted by length, input order restored) returns [N, D]
    embeddings (numpy or torch, float32 unless ``precision`` says otherwise); ``forward(batch)`` runs with
    gradients on a batch from :meth:`tokenize` and is usable as a training / GradCache encoder.

    Args:
        model: a ``transformers`` model (``AutoModel``; a ``*ForCausalLM`` is reduced to its base model), or
            one wrapped by ``torch.compile`` (an AutoModel stays compiled; a compiled ``*ForCausalLM``'s base
            model runs uncompiled, with a warning: compile the AutoModel instead), or a ``peft.PeftModel``
            with layer adapters (LoRA, DoRA, IA3, ...; over either class): the model under it runs, adapters
            in place; :meth:`save_pretrained` writes the adapter only (PEFT's format), see :attr:`peft_model`.
        tokenizer: its tokenizer (a fast one gives offset mappings; a slow one is checked token by token).
        pooling: "last", "mean", "weighted_mean", "max", "first", "mean_sqrt_len" or a sentence-transformers
            name; None picks the prompt style's, else "last" for decoders and "mean" for encoders.
        normalize: L2-normalize the embeddings. dims: Matryoshka width (the first ``dims`` columns).
        max_length: tokens per sequence, template and special tokens included (truncation cuts text only);
            at most the model's learned positions (rotary models may go past their nominal length; default:
            the tokenizer's, capped at the model's positions).
        padding_side: "left" or "right" (both give the same embeddings; default: the tokenizer's).
        add_eos: append EOS when the tokenizer does not (None: for decoders with last-token pooling whose
            tokenizer has one, unless the prompt style or a sentence-transformers folder says otherwise). A
            style without EOS (PromptEOL, ...) drops the one a decoder's tokenizer appends itself.
        prompt_style: a name from :data:`PROMPT_STYLES` ("none", "instruct", "qwen3", "prompteol", "pcot",
            "ke", "echo"), a template with ``{text}``, or a :class:`PromptStyle`.
        instruction_template: how ``instruction=`` is applied (``"Instruct: {instruction}\\nQuery: {text}"``).
        include_prompt: pool the prompt/instruction tokens too (None: the style's or folder's, else no).
            Excluded prompts end where the text's first token starts: a token that merges the prompt's
            trailing space with the text (byte-level BPE: ``"query: hello"`` -> ``' hello'``) counts as
            text. sentence-transformers drops ``len(tokenize(prompt))`` tokens instead, which drops that
            token too, so mean/cls/max embeddings of such folders differ from its own; prompts ending in a
            newline (or tokenizers that do not merge across the space) agree.
        prompts: named prompt prefixes (sentence-transformers' ``prompts``): a mapping of str to str, e.g.
            {"query": "query: "}.
        default_prompt_name: the name in ``prompts`` of the prompt that :meth:`encode` and
            :meth:`encode_late_chunks` apply when given no prompt, prompt_name or instruction.
        packed: True, False or "auto" (packed only where the attention reads packed sequences natively);
            True needs a model whose forward takes ``position_ids``.
        truncate_dim: sentence-transformers' ``truncate_dim``: :meth:`encode` keeps the first
            ``truncate_dim`` columns of the finished (normalized) embeddings, not re-normalized (``dims``
            re-normalizes its prefix). similarity_fn_name: what :meth:`similarity` computes ("cosine", "dot",
            "euclidean", "manhattan"; None: cosine).
        lowercase: lower-case the prompt and text before tokenizing (a sentence-transformers folder's
            ``do_lower_case``; None: False).

    ``normalize``, ``add_eos``, ``include_prompt`` and ``lowercase`` take True, False or None (a TypeError
    names any other value).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        pooling: str | None = None,
        normalize: bool | None = True,
        dims: int | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        add_eos: bool | None = None,
        instruction_template: str | None = None,
        prompt_style=None,
        include_prompt: bool | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        packed="auto",
        device=None,
        dtype=None,
        lowercase: bool | None = False,
        truncate_dim: int | None = None,
        similarity_fn_name: str | None = None,
        _st_folder: bool = False,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}"
            )
        if tokenizer is None or not callable(tokenizer):
            raise TypeError("tokenizer must be a transformers tokenizer")
        peft_model = None
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module) and adapters.is_peft_model(orig):
            _warn.warn("LLMEmbedder runs the model under the torch.compile'd PeftModel uncompiled (the "
                       "PeftModel's own forward is not the embedder's); compile emb.model to run compiled")
            model = orig
        if adapters.is_peft_model(model):  # run the model under it, adapters in place (see adapters.py)
            peft_model, model = model, adapters.backbone(model)
        self.model = encoder_module(model)
        # not a registered submodule: its parameters are the model's, and would be state_dict keys twice
        object.__setattr__(self, "_peft_model", peft_model)
        self.tokenizer = tokenizer
        self.config = getattr(self.model, "config", None)
        self.is_decoder = is_decoder_model(self.config) if self.config is not None else False
        self.causal = causal_attention(self.config) if self.config is not None else False
        self._position_offset = position_offset(self.model)
        # dynamic-NTK / longrope rotary: sequences past this length run in batches of their own
        self._rope_switch = rope_switch_positions(self.config) if self.config is not None else None
        self.style: PromptStyle = get_style(prompt_style)
        if instruction_template is not None:
            check_template(instruction_template, "instruction_template", instruction=True)
        self.instruction_template = instruction_template or self.style.instruction_template
        if pooling is not None:
            self.pooling = resolve_pooling(pooling)
        elif self.style.pooling is not None:
            try:
                self.pooling = resolve_pooling(self.style.pooling)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"prompt_style.pooling: {exc}") from None
        else:
            self.pooling = "last" if self.is_decoder else "mean"
        normalize = check_bool(normalize, "normalize")
        self.normalize = True if normalize is None else normalize
        self.dims = check_positive(dims, "dims")
        hidden = output_width(self.config) if self.config is not None else None
        if self.dims is not None and hidden is not None and self.dims > hidden:
            raise ValueError(f"dims must be at most the model's output width {hidden}, got {dims}")
        self.embedding_dim = self.dims or hidden
        self.truncate_dim = truncate_dim
        self.similarity_fn_name = similarity_fn_name
        if padding_side is None:
            padding_side = getattr(tokenizer, "padding_side", None) or "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.info = probe_tokenizer(tokenizer)
        add_eos = check_bool(add_eos, "add_eos")
        if add_eos is None:
            add_eos = self.style.add_eos
        if add_eos is None:  # a tokenizer without EOS: the last text token is pooled
            add_eos = (not _st_folder) and self.is_decoder and self.pooling == "last"
            add_eos = add_eos and (self.info.eos_id is not None or self.info.adds_eos)
        self.add_eos = bool(add_eos)
        if self.add_eos and self.info.eos_id is None and not self.info.adds_eos:
            raise ValueError("add_eos=True but the tokenizer has no eos_token")
        # a prompting style that reads the state after its prompt (PromptEOL, ...) drops the terminator a
        # decoder's tokenizer appends itself (e5-mistral style), as it appends none
        self.strip_eos = not self.add_eos and self.style.add_eos is False and self.is_decoder
        include_prompt = check_bool(include_prompt, "include_prompt")
        if include_prompt is None:
            include_prompt = self.style.include_prompt if self.style.include_prompt is not None else False
        self.include_prompt = bool(include_prompt)
        self.max_length = self._check_max_length(max_length) or self._default_max_length()
        self.prompts = check_prompts(prompts)
        self.default_prompt_name = check_default_prompt_name(default_prompt_name, self.prompts)
        self.lowercase = bool(check_bool(lowercase, "lowercase"))
        dtype = resolve_dtype(dtype)
        device = check_device(device)
        if device is not None or dtype is not None:
            self.model.to(device=device, dtype=dtype)
        self.model.eval()
        params = inspect.signature(getattr(self.model, "_orig_mod", self.model).forward).parameters
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self._takes_position_ids = "position_ids" in params
        self._takes_use_cache = "use_cache" in params or (takes_kwargs and self.is_decoder)
        self.packed = packed
        self._use_packed(packed)  # checks packed=True against the model

    # ------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        dims: int | None = None,
        dtype=None,
        device=None,
        max_length: int | None = None,
        padding_side: str | None = None,
        add_eos: bool | None = None,
        instruction_template: str | None = None,
        prompt_style=None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        include_prompt: bool | None = None,
        packed="auto",
        is_trainable: bool = False,
        truncate_dim: int | None = None,
        similarity_fn_name: str | None = None,
        **model_kwargs,
    ) -> LLMEmbedder:
        """Load ``AutoModel`` + tokenizer from a folder or Hub id; a sentence-transformers folder's Pooling,
        Normalize, max length and prompts are read so that known models need no flags. A folder written by
        :meth:`save_pretrained` fills the settings the call leaves None (a ``pooling`` other than the saved
        one resolves its own ``add_eos`` default; a ``prompt_style`` its own pooling, prompt and EOS).

        ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU; ``device`` to CUDA when available.
        Extra keyword arguments go to the model's ``from_pretrained``; ``gguf_file``, ``revision``, ``token``
        and ``cache_dir`` go to the tokenizer's as well.

        A PEFT adapter folder (``adapter_config.json``, e.g. from :meth:`save_pretrained` of an embedder
        with an adapter) loads its base model (``base_model_name_or_path``; ``AutoModelForCausalLM`` for a
        CAUSAL_LM adapter, whose keys are written under it) and the adapter over it, frozen unless
        ``is_trainable`` (needs ``peft``).
        """
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            _deps.raise_missing(exc, "transformers", "hf", "LLMEmbedder.from_pretrained")

        # before any loading (the constructor checks them again)
        check_bool(normalize, "normalize")
        check_bool(add_eos, "add_eos")
        check_bool(include_prompt, "include_prompt")
        if not isinstance(is_trainable, bool):
            raise TypeError(f"is_trainable must be True or False, got {is_trainable!r}")
        if not isinstance(path_or_id, (str, os.PathLike)):
            raise TypeError(f"path_or_id must be a string or path, got {type(path_or_id).__name__}")
        path_or_id = os.fspath(path_or_id)
        if path_or_id.startswith("~"):  # never a Hub id: the user's folder, as a shell would expand it
            path_or_id = os.path.expanduser(path_or_id)
        is_dir = os.path.isdir(path_or_id)
        if not is_dir and (
            path_or_id.startswith((".", "/", "~"))
            or path_or_id.count("/") > 1
            or os.path.exists(path_or_id)
            or not path_or_id.strip()
        ):
            raise FileNotFoundError(f"path_or_id: no model folder at {path_or_id!r}")
        saved = _read_settings(path_or_id) if is_dir else None
        st = read_st_folder(path_or_id) if is_dir else None
        if saved is not None and st is not None:  # save_pretrained into a sentence-transformers folder, or
            # sentence-transformers saving over one of ours: the newer file describes the model at hand
            newer_st = os.path.getmtime(os.path.join(path_or_id, "modules.json")) > os.path.getmtime(
                os.path.join(path_or_id, SETTINGS_FILE)
            )
            st, saved = (st, None) if newer_st else (None, saved)
        model_path = st.transformer_path if st else path_or_id
        adapter = None  # a PEFT adapter folder: (its folder, its adapter config, the base model's path)
        # ours, PEFT's, or a sentence-transformers folder whose Transformer holds one (``saved`` is None then)
        if is_dir and _holds_adapter(model_path, saved):
            cfg = adapters.read_config(model_path)
            adapter = (model_path, cfg, adapters.base_model_path(model_path, cfg))
            has_tokenizer = any(os.path.isfile(os.path.join(model_path, f))
                                for f in ("tokenizer.json", "tokenizer_config.json"))
            model_path = model_path if has_tokenizer else adapter[2]
        elif (
            is_dir
            and not model_kwargs.get("gguf_file")
            and not os.path.isfile(os.path.join(model_path, "config.json"))
        ):
            where = "" if model_path == path_or_id else f" in {model_path!r}"
            raise FileNotFoundError(
                f"path_or_id: the folder {path_or_id!r} holds no model (no config.json{where}; "
                "a GGUF model needs gguf_file=)"
            )
        device = (
            check_device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        dtype = resolve_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        tok_kwargs = {
            k: v for k, v in model_kwargs.items() if k in ("gguf_file", "revision", "token", "cache_dir")
        }
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_path, trust_remote_code=trust_remote_code, **tok_kwargs
            )
        except OSError as exc:
            if is_dir:
                raise
            raise FileNotFoundError(
                f"path_or_id: {path_or_id!r} is not a folder, and loading it as a Hub id failed: {exc}"
            ) from exc
        load_kwargs = dict(model_kwargs, trust_remote_code=trust_remote_code)
        load_kwargs[dtype_kwarg()] = dtype
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        if adapter is None:
            model = AutoModel.from_pretrained(model_path, **load_kwargs)
        else:  # the base model (the class the adapter's keys were written under), then the adapter
            if adapters.wants_lm_head(adapter[1], saved):
                from transformers import AutoModelForCausalLM as auto_class
            else:
                auto_class = AutoModel
            base = auto_class.from_pretrained(adapter[2], **load_kwargs)
            model = adapters.load_into(base, adapter[0], is_trainable=is_trainable)
        kw = dict(
            pooling=pooling,
            normalize=normalize,
            dims=dims,
            max_length=max_length,
            padding_side=padding_side,
            add_eos=add_eos,
            instruction_template=instruction_template,
            prompt_style=prompt_style,
            include_prompt=include_prompt,
            packed=packed,
            device=device,
            truncate_dim=truncate_dim,
            similarity_fn_name=similarity_fn_name,
        )
        if st is not None:
            style = get_style(prompt_style)
            if pooling is None and style.pooling is None:
                kw["pooling"] = st.pooling
            if normalize is None:
                kw["normalize"] = st.normalize
            if max_length is None and st.max_seq_length is not None:
                n_pos = max_positions(getattr(model, "config", None))
                n_pos = n_pos - position_offset(model) if n_pos else None
                kw["max_length"] = min(st.max_seq_length, n_pos) if n_pos else st.max_seq_length
            if include_prompt is None and style.include_prompt is None:
                kw["include_prompt"] = st.include_prompt
            if similarity_fn_name is None:
                kw["similarity_fn_name"] = st.similarity_fn_name
            kw.update(
                prompts=st.prompts,
                default_prompt_name=st.default_prompt_name,
                lowercase=st.do_lower_case,
                _st_folder=True,
            )
        if saved is not None:  # a folder from save_pretrained: its settings fill what the call leaves None
            # a prompt style given here decides its own pooling / prompt / EOS / instruction settings; a
            # pooling given here (another than the saved one) its own EOS default, as on the original folder
            keys = _SETTINGS if prompt_style is None else ("normalize", "dims", "max_length", "padding_side",
                                                           "truncate_dim", "similarity_fn_name")
            if pooling is not None and pooling != saved.get("pooling"):
                keys = tuple(k for k in keys if k != "add_eos")
            for key in keys:
                if kw[key] is None:
                    kw[key] = saved.get(key)
            if prompt_style is None and isinstance(saved.get("prompt_style"), dict):
                try:
                    kw["prompt_style"] = PromptStyle(**saved["prompt_style"])
                except TypeError as exc:
                    raise ValueError(f"path_or_id: bad prompt_style in {SETTINGS_FILE}: {exc}") from None
            kw.update(prompts=saved.get("prompts") or {}, lowercase=saved.get("lowercase", False),
                      default_prompt_name=saved.get("default_prompt_name"))
        return cls(model, tokenizer, **kw)

    def _inner_model(self) -> nn.Module:
        """The wrapped model itself (a torch.compile'd one's original module)."""
        return getattr(self.model, "_orig_mod", self.model)

    @property
    def peft_model(self) -> nn.Module | None:
        """The ``peft.PeftModel`` the embedder was built from (None without one): its parameters are the
        model's, so ``peft_model.print_trainable_parameters()`` etc. describe what trains."""
        return self._peft_model

    def _has_adapter(self) -> bool:
        """Whether the model's files are an adapter: a PeftModel's, or the model's own (``add_adapter``)."""
        return self._peft_model is not None or adapters.has_native_adapter(self._inner_model())

    def merge_adapter(self) -> LLMEmbedder:
        """Merge the PEFT adapter into the model's weights (``merge_and_unload``): the same embeddings, no
        adapter layers, and :meth:`save_pretrained` then writes the whole model. Returns ``self``."""
        if self._peft_model is None:
            raise ValueError("merge_adapter: this embedder's model is not under a PEFT PeftModel (an adapter "
                             "added by transformers' add_adapter is merged with peft itself)")
        adapters.check_attached(self._peft_model, self._inner_model())
        adapters.check_mergeable(self._peft_model, self._inner_model())
        self._peft_model.merge_and_unload()  # replaces the adapter layers inside self.model in place
        object.__setattr__(self, "_peft_model", None)
        return self

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write the model (``save_pretrained``), its tokenizer and this embedder's settings (pooling,
        normalization, dims, prompt style and prompts, truncation, EOS, padding side) to the folder ``path``:
        ``LLMEmbedder.from_pretrained(path)`` gives the same embeddings at the same dtype (the dtype is not
        a setting: ``from_pretrained``'s default applies, so pass ``dtype=`` to reload a bfloat16 model as
        bfloat16 on the CPU). Into a sentence-transformers folder, this save wins on reload while it is the
        newer one (a warning says so). ``state_dict``: this embedder's
        state dict to write instead of the model's own tensors (e.g. one gathered from FSDP shards).
        Tensors of modules registered on the embedder itself, beside the model (a loss with a learned
        temperature, say), go to ``llmembed_fast_extra.safetensors``; :meth:`load_weights` restores them
        (``from_pretrained`` builds a bare embedder and leaves them out). With a PEFT adapter
        (:attr:`peft_model`) the model's files are the adapter's alone (``adapter_config.json``,
        ``adapter_model.safetensors``), over the base model its config names (call :meth:`merge_adapter`
        first to save the whole merged model instead)."""
        path = os.fspath(path)
        inner = self._inner_model()
        if not callable(getattr(inner, "save_pretrained", None)):
            raise TypeError(f"{type(inner).__name__} has no save_pretrained(): save its weights yourself")
        if os.path.isfile(os.path.join(path, "modules.json")):
            _warn.warn(
                f"path: {path!r} is a sentence-transformers folder; LLMEmbedder.from_pretrained will read "
                "this save (its settings file is newer than modules.json), but sentence-transformers itself "
                "still loads the modules that modules.json names. Save to a new folder to keep them apart.",
                UserWarning,
            )
        peft_model = self._peft_model
        if peft_model is not None:
            adapters.check_attached(peft_model, inner)
        else:
            adapters.check_no_stray_layers(inner)
        kwargs = {}
        if state_dict is not None:  # keys "model.<name>" (or "model._orig_mod.<name>") -> "<name>"
            inner_sd, extra, own = {}, {}, None
            for key, value in state_dict.items():
                if not key.startswith("model."):
                    own = set(self.state_dict()) if own is None else own
                    if key not in own:
                        raise ValueError(f"state_dict: key {key!r} is not one of this embedder's")
                    extra[key] = value
                    continue
                key = key[len("model."):]
                inner_sd[key.removeprefix("_orig_mod.")] = value
            kwargs["state_dict"] = inner_sd
        else:
            extra = {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}
        os.makedirs(path, exist_ok=True)
        if peft_model is not None:  # the adapter alone; from_pretrained loads it over its base model
            adapters.save(peft_model, inner, path, kwargs.get("state_dict"))
        else:
            # an earlier adapter save's files: transformers would load that adapter over its base instead
            for name in (adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS, "adapter_model.bin"):
                if os.path.isfile(os.path.join(path, name)):
                    os.remove(os.path.join(path, name))
            inner.save_pretrained(path, **kwargs)
        extra_path = os.path.join(path, EXTRA_FILE)
        if extra:  # e.g. a learned temperature trained with the model: a checkpoint must keep it
            from safetensors.torch import save_file

            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in extra.items()}, extra_path)
        elif os.path.exists(extra_path):  # an earlier save's, which would be restored by mistake
            os.remove(extra_path)
        self.tokenizer.save_pretrained(path)
        settings = {"format": 1, **{key: getattr(self, key) for key in _SETTINGS},
                    "prompt_style": dataclasses.asdict(self.style), "prompts": self.prompts,
                    "default_prompt_name": self.default_prompt_name, "lowercase": self.lowercase,
                    "adapter": self._has_adapter(),
                    "adapter_over_lm_head": bool(peft_model and adapters.over_lm_head(peft_model, inner))}
        with open(os.path.join(path, SETTINGS_FILE), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load the model weights that :meth:`save_pretrained` wrote to the folder ``path`` into this
        embedder, in place (settings, tokenizer, device and dtype unchanged), and the embedder's other
        tensors it wrote (modules registered beside the model; each must exist here). The folder's model
        is loaded once on the CPU first, so this briefly needs a second copy of the weights in host memory."""
        path = os.fspath(path)
        inner = self._inner_model()
        holds_adapter = os.path.isdir(path) and _holds_adapter(path, _read_settings(path, "path"))
        if self._has_adapter():  # the adapter's tensors, in place
            if self._peft_model is not None:
                adapters.check_attached(self._peft_model, inner)
            if not holds_adapter:
                raise ValueError(f"path: {path!r} holds no PEFT adapter ({adapters.ADAPTER_CONFIG}), and "
                                 "this embedder's model carries one")
            adapters.load(self._peft_model if self._peft_model is not None else inner, path)
        elif holds_adapter:
            raise ValueError(f"path: {path!r} holds a PEFT adapter and this embedder's model has none: "
                             "load it with LLMEmbedder.from_pretrained(path)")
        else:
            if not callable(getattr(type(inner), "from_pretrained", None)):
                raise TypeError(f"{type(inner).__name__} has no from_pretrained(): load its weights yourself")
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"path: {path!r} holds no saved model (no config.json)")
            loaded = type(inner).from_pretrained(path, **{dtype_kwarg(): self._compute_dtype()})
            inner.load_state_dict(loaded.state_dict())
        extra_path = os.path.join(path, EXTRA_FILE)
        if os.path.isfile(extra_path):  # the embedder's other tensors (see save_pretrained)
            from safetensors.torch import load_file

            extra = load_file(extra_path)
            unknown = sorted(set(extra) - set(self.state_dict()))
            if unknown:
                raise ValueError(f"path: {EXTRA_FILE} holds tensors this embedder has no place for: "
                                 f"{unknown} (register the same modules on it before loading)")
            self.load_state_dict(extra, strict=False)

    def _n_positions(self) -> int | None:
        """Tokens the position table holds for one sequence (RoBERTa-style tables lose their offset)."""
        n_pos = max_positions(self.config)
        return None if n_pos is None else n_pos - self._position_offset

    def _default_max_length(self) -> int | None:
        n_pos = self._n_positions()
        n = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(n, int) and 0 < n < 1_000_000:
            return min(n, n_pos) if n_pos else n
        return n_pos

    def _check_max_length(self, value, name: str = "max_length") -> int | None:
        value = check_positive(value, name)
        n_pos = self._n_positions()
        too_long = value is not None and n_pos is not None and value > n_pos
        if too_long and not rotary_positions(self.config):  # a learned position table would be indexed past
            raise ValueError(
                f"{name}={value} is longer than the model's {n_pos} positions "
                "(max_position_embeddings / n_positions, less the padding offset of RoBERTa-style tables); "
                f"pass {name} <= that"
            )
        return value

    # ------------------------------------------------------------------------------------------------
    # sentence-transformers' names (see st_names.py)
    # ------------------------------------------------------------------------------------------------

    @property
    def max_seq_length(self) -> int | None:
        """sentence-transformers' name of :attr:`max_length` (settable, checked as in the constructor)."""
        return self.max_length

    @max_seq_length.setter
    def max_seq_length(self, value) -> None:
        self.max_length = self._check_max_length(value, "max_seq_length")

    @property
    def truncate_dim(self) -> int | None:
        """Columns :meth:`encode` keeps of the finished embeddings (None: all), not re-normalized."""
        return self._truncate_dim

    @truncate_dim.setter
    def truncate_dim(self, value) -> None:
        self._truncate_dim = st_names.check_truncate_dim(value, self.embedding_dim)

    @property
    def similarity_fn_name(self) -> str:
        """What :meth:`similarity` computes: "cosine" (the default), "dot", "euclidean" or "manhattan"."""
        return self._similarity_fn_name or "cosine"

    @similarity_fn_name.setter
    def similarity_fn_name(self, value) -> None:
        self._similarity_fn_name = st_names.check_similarity_fn_name(value)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """[N, M] float32 tensor: :attr:`similarity_fn_name` of each row of ``embeddings1`` [N, D] with each
        of ``embeddings2`` [M, D] (arrays or tensors; a 1-D input is one row); distances come negated."""
        return st_names.similarity(embeddings1, embeddings2, self.similarity_fn_name)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """[N] float32 tensor: :attr:`similarity_fn_name` of row i of ``embeddings1`` with row i of
        ``embeddings2`` (both [N, D])."""
        return st_names.similarity_pairwise(embeddings1, embeddings2, self.similarity_fn_name)

    def get_input_embeddings(self) -> nn.Module:
        """The wrapped model's input embedding layer (what HF Trainer's NEFTune hooks into)."""
        return self._inner_model().get_input_embeddings()

    def get_embedding_dimension(self) -> int | None:
        """Width of :meth:`encode`'s embeddings (``truncate_dim`` if set, else ``dims`` or the model's)."""
        return self.truncate_dim or self.embedding_dim

    get_sentence_embedding_dimension = get_embedding_dimension

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _compute_dtype(self) -> torch.dtype:
        dt = getattr(self.model, "dtype", None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def _pad_multiple(self) -> int:
        return 8 if self.device.type == "cuda" else 1

    def _default_max_tokens(self) -> int:
        return 16384 if self.device.type == "cuda" else 8192

    def _min_batch_tokens(self, budget: int) -> int:
        # below this many padded tokens a batch underuses the device, so padding is cheaper than splitting
        return budget // 4 if self.device.type == "cuda" else min(256, budget)

    # ------------------------------------------------------------------------------------------------
    # tokenization
    # ------------------------------------------------------------------------------------------------

    def template_for(self, instruction: str | None = None, prompt: str | None = None) -> str:
        """The full template (with ``{text}`` slots) for an optional instruction and prompt prefix."""
        template = self.style.template
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
            if TEXT in prompt:
                raise ValueError(
                    "prompt is a prefix and must not contain '{text}' (use prompt_style for templates)"
                )
            check_text(prompt, "prompt")
            template = prompt + template
        if instruction is not None and isinstance(instruction, str):
            check_text(instruction, "instruction")
        template = compose(template, instruction, self.instruction_template)
        # lower-casing models (a sentence-transformers folder's do_lower_case) lower the prompt with the text
        return template.lower() if self.lowercase else template

    def _tokenize(
        self, texts: list[str], instruction=None, prompt=None, *, return_text_spans=False
    ) -> Tokenized:
        if self.lowercase:
            texts = [t.lower() for t in texts]
        template = self.template_for(instruction, prompt)
        return tokenize_texts(
            self.tokenizer,
            self.info,
            texts,
            template,
            pool_copy=self.style.pool_copy,
            include_prompt=self.include_prompt,
            max_length=self.max_length,
            add_eos=self.add_eos,
            strip_eos=self.strip_eos,
            return_text_spans=return_text_spans,
        )

    def tokenize(
        self, texts, *, instruction: str | None = None, prompt: str | None = None, device=None
    ) -> dict[str, torch.Tensor]:
        """One padded batch for :meth:`forward`: input_ids, attention_mask, position_ids, pool_mask [B, L]."""
        texts, _ = check_texts(texts)
        tok = self._tokenize(texts, instruction, prompt)
        return batching.pad_batch(
            tok.ids,
            tok.pool_starts,
            pad_id=self.info.pad_id,
            padding_side=self.padding_side,
            device=device or self.device,
        )

    # ------------------------------------------------------------------------------------------------
    # forward passes
    # ------------------------------------------------------------------------------------------------

    def _run(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_position_ids and position_ids is not None:
            # batching numbers each sequence's tokens from 0; RoBERTa-style models count from their offset
            off = self._position_offset
            kw["position_ids"] = position_ids + off if off else position_ids
        if self._takes_use_cache:
            kw["use_cache"] = False
        return last_hidden(self.model(**kw))

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states [B, L, H] of a padded batch."""
        return self._run(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))

    def forward(self, batch, *, normalize: bool | None = None, dims=None) -> torch.Tensor:
        """Embeddings [B, D] float32 of a padded batch (from :meth:`tokenize`, or texts), with gradients."""
        if isinstance(batch, (str, list, tuple)):
            batch = self.tokenize(batch)
        if not isinstance(batch, dict) or "input_ids" not in batch or "pool_mask" not in batch:
            raise TypeError(
                "batch must be a dict from LLMEmbedder.tokenize (input_ids, attention_mask, "
                "position_ids, pool_mask) or a list of strings"
            )
        return self._pool_padded(
            self.hidden_states(batch),
            batch,
            dims=dims if dims is not None else self.dims,
            normalize=self.resolve_normalize(normalize),
        )

    def _weights_by_position(self) -> bool:
        """sentence-transformers' weighted mean weighs a token by its position in the whole sequence
        (1, 2, ...), the prompt's tokens counted even when they are not pooled; the fused ``pool`` weighs by
        rank inside the pooled region, which is the same whenever that region starts the sequence."""
        return self.pooling == "weighted_mean" and not self.include_prompt

    def _pool_padded(self, hidden, batch, *, dims, normalize) -> torch.Tensor:
        if not self._weights_by_position():
            return pool(hidden, batch["pool_mask"], self.pooling, dims=dims, normalize=normalize)
        w = (batch["position_ids"] + 1).to(torch.float32) * batch["pool_mask"]
        emb = torch.bmm(w[:, None, :], hidden.float())[:, 0] / w.sum(1, keepdim=True).clamp_min(1e-9)
        return _finish(emb, dims, normalize)

    def _pool_packed(self, hidden, p, *, dims, normalize) -> torch.Tensor:
        if not self._weights_by_position():
            return pool_segments(hidden, p["starts"], p["ends"], self.pooling, dims=dims, normalize=normalize)
        starts, ends = p["starts"], p["ends"]
        pos = torch.arange(hidden.shape[0], device=hidden.device)
        seg = torch.searchsorted(ends, pos, right=True)  # each token's sequence (segments are contiguous)
        w = (p["position_ids"][0] + 1).to(torch.float32) * (pos >= starts[seg])  # 0 on excluded prompt tokens
        emb = hidden.new_zeros(len(ends), hidden.shape[1], dtype=torch.float32)
        emb.index_add_(0, seg, hidden.float() * w[:, None])
        den = w.new_zeros(len(ends)).index_add_(0, seg, w)
        return _finish(emb / den[:, None].clamp_min(1e-9), dims, normalize)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        """Turn on the wrapped model's activation (gradient) checkpointing: what HF Trainer's
        ``gradient_checkpointing=True`` / ``activation_checkpointing=True`` calls. Keywords go to the
        model's own method (``activation_checkpointing_enable``, or ``gradient_checkpointing_enable`` on
        older transformers)."""
        inner = getattr(self.model, "_orig_mod", self.model)
        fn = getattr(inner, "activation_checkpointing_enable", None)
        if callable(fn):
            fn(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        else:
            fn = getattr(inner, "gradient_checkpointing_enable", None)
            if not callable(fn):
                raise ValueError(f"{type(inner).__name__} has no activation/gradient checkpointing to enable")
            fn(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        if self._peft_model is not None and callable(getattr(inner, "enable_input_require_grads", None)):
            # frozen embeddings under an adapter: a reentrant checkpoint (transformers 4's default) whose
            # inputs need no gradient runs no backward, and the adapters inside it would get none (PEFT does
            # this when checkpointing is on before it wraps the model; transformers 5 does it itself)
            inner.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (its older transformers name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def resolve_normalize(self, normalize) -> bool:
        """A call's ``normalize`` (True, False, or None for the embedder's own)."""
        normalize = check_bool(normalize, "normalize")
        return self.normalize if normalize is None else normalize

    def _use_packed(self, packed) -> bool:
        packed = self.packed if packed is None else packed
        if packed not in (True, False, "auto"):
            raise ValueError(f"packed must be True, False or 'auto', got {packed!r}")
        if packed == "auto":
            return packed_mod.uses_varlen_flash(self.model) and self._takes_position_ids
        if packed and not self._takes_position_ids:
            raise ValueError(
                f"packed=True needs a model whose forward takes position_ids ({type(self.model).__name__} "
                "does not, so packed sequences would not restart their positions); use packed=False"
            )
        return bool(packed)

    def _packed_mask_kind(self) -> str | None:
        """The form of custom mask this model honours for a packed row (probed once, see
        :func:`packed.probe_mask_kind`); None, with a warning, when it honours none: packed batches then
        run padded."""
        kind = self.__dict__.get("_mask_kind", "unprobed")
        if kind == "unprobed":
            kind = packed_mod.probe_mask_kind(
                self._run,
                vocab_size=getattr(self.config, "vocab_size", None),
                causal=self.causal,
                dtype=self._compute_dtype(),
                device=self.device,
            )
            if kind is None:
                _warn.warn(
                    f"packed=True: {type(self.model).__name__} under this transformers does not isolate "
                    "the sequences of a packed row with a custom attention mask; its batches run padded "
                    "(same embeddings)"
                )
            self.__dict__["_mask_kind"] = kind
        return kind

    def _embed_batch(self, seqs, starts, *, packed: bool, normalize: bool, dims) -> torch.Tensor:
        dev = self.device
        if packed and not packed_mod.uses_varlen_flash(self.model):
            # the block-diagonal mask replaces the model's own, sliding windows included: a sequence longer
            # than a window runs padded, where the model applies it (shorter ones see the same either way)
            window = packed_mod.sliding_window(self.model)
            packed = window is None or max(map(len, seqs), default=0) <= window
            packed = packed and self._packed_mask_kind() is not None
        if not packed:
            b = batching.pad_batch(
                seqs,
                starts,
                pad_id=self.info.pad_id,
                padding_side=self.padding_side,
                pad_to_multiple_of=self._pad_multiple(),
                device=dev,
            )
            return self._pool_padded(self.hidden_states(b), b, dims=dims, normalize=normalize)
        width = dims or self.embedding_dim
        if width and not any(seqs):  # only zero-token texts: the zero rows the padded path pools
            return torch.zeros(len(seqs), width, dtype=torch.float32, device=dev)
        p = batching.pack_batch(seqs, starts)  # on the host: the mask below is built without a device sync
        if packed_mod.uses_varlen_flash(self.model):
            mask = None  # flash-attention varlen reads sequence boundaries from position_ids
        else:
            mask = packed_mod.packed_mask(
                p["cu_seqlens"], self._packed_mask_kind(), causal=self.causal, dtype=self._compute_dtype(),
                device=dev,
            )
        p = {k: v.to(dev, non_blocking=True) for k, v in p.items()}
        hidden = self._run(p["input_ids"], mask, p["position_ids"])[0]
        return self._pool_packed(hidden, p, dims=dims, normalize=normalize)

    # ------------------------------------------------------------------------------------------------
    # encode
    # ------------------------------------------------------------------------------------------------

    def encode_float(
        self,
        texts: list[str],
        *,
        instruction=None,
        prompt=None,
        batch_size=None,
        max_tokens_per_batch=None,
        normalize=None,
        dims=None,
        packed=None,
        show_progress_bar: bool = False,
    ) -> torch.Tensor:
        """Embeddings [N, D] float32 on the model's device, in input order (no argument checks on texts)."""
        normalize = self.resolve_normalize(normalize)
        dims = self.dims if dims is None else check_positive(dims, "dims")
        use_packed = self._use_packed(packed)
        if not len(texts):
            return torch.empty(0, dims or self.embedding_dim or 0, dtype=torch.float32, device=self.device)
        tok = self._tokenize(texts, instruction, prompt)
        lengths = tok.lengths()
        budget = max_tokens_per_batch or self._default_max_tokens()
        plan = batching.plan_batches(
            lengths,
            max_tokens=budget,
            batch_size=batch_size,
            pad_to_multiple_of=1 if use_packed else self._pad_multiple(),
            min_tokens=self._min_batch_tokens(budget),
            max_waste=None if use_packed else 0.15,
        )
        if self._rope_switch is not None:  # the batch's longest sequence would set everyone's frequencies
            plan = batching.isolate_longer(plan, lengths, self._rope_switch)
        dev = self.device
        # without dims the width is the first batch's (a config's hidden_size is not always the output's)
        out = _poison.empty(len(texts), dims, dtype=torch.float32, device=dev) if dims else None
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(sum(lengths)), unit="tok", desc="encode")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for idx in plan:
                    emb = self._embed_batch(
                        [tok.ids[i] for i in idx],
                        [tok.pool_starts[i] for i in idx],
                        packed=use_packed,
                        normalize=normalize,
                        dims=dims,
                    )
                    if out is None:  # a normal tensor, as with dims (autograd may use it; inference tensors
                        with torch.inference_mode(False):  # cannot be saved for backward or changed in place)
                            out = _poison.empty(len(texts), emb.shape[1], dtype=torch.float32, device=dev)
                    out[torch.from_numpy(idx).to(dev)] = emb
                    if bar is not None:
                        bar.update(int(sum(lengths[i] for i in idx)))
        finally:
            if bar is not None:
                bar.close()
            self.model.train(was_training)
        return out

    def encode(
        self,
        texts,
        *,
        instruction: str | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
        batch_size: int | None = None,
        max_tokens_per_batch: int | None = None,
        precision: str | None = "float32",
        output: str | None = None,
        show_progress_bar: bool | None = None,
        normalize: bool | None = None,
        dims: int | None = None,
        packed=None,
        distributed: bool = False,
        ranges=None,
        calibration_embeddings=None,
        convert_to_tensor: bool | None = None,
        convert_to_numpy: bool | None = None,
        normalize_embeddings: bool | None = None,
        truncate_dim: int | None = None,
        **unsupported,
    ):
        """Embed ``texts`` (a string or a non-empty list of strings).

        Args:
            instruction: task instruction, applied with the instruction template and excluded from pooling
                unless ``include_prompt``.
            prompt / prompt_name: a prompt prefix, or the name of one in ``self.prompts`` (neither, and no
                instruction: the ``default_prompt_name`` prompt, if any; see :meth:`resolve_prompt`).
            batch_size: most sequences per batch (None: no cap). max_tokens_per_batch: padded tokens per batch
                (default 16384 on CUDA, 8192 on CPU). Batches are sorted by length; input order is restored.
            precision: "float32", "float16", or quantized "int8", "uint8", "binary", "ubinary"
                (via :func:`llmembed_fast.quant.quantize`; ``ranges``/``calibration_embeddings`` go to it for
                int8/uint8 and are refused with any other precision).
            output: "numpy" (default) or "torch" (a tensor on the model's device).
            distributed: under ``torch.distributed``, each rank encodes a shard and rank 0 gets all
                embeddings in input order (other ranks get None).
            convert_to_tensor, convert_to_numpy, normalize_embeddings, truncate_dim: sentence-transformers'
                keywords, with its meaning: ``convert_to_tensor=True`` (or ``convert_to_numpy=False``) is
                ``output="torch"``; ``truncate_dim`` keeps the first columns of the finished embeddings, not
                re-normalized (None: :attr:`truncate_dim`; ``dims`` re-normalizes its prefix);
                ``normalize_embeddings=True`` L2-normalizes them after that (False adds no normalization:
                the embedder's own applies).
                Its ``output_value``, ``device``, ``pool``, ``chunk_size`` and ``task`` raise a TypeError
                saying what to use instead. ``precision=None`` is "float32".

        Returns:
            [N, D] (or [D] for a single string) float32 / float16 / int8 / uint8 array or tensor.
        """
        try:
            st_names.refuse_unknown(unsupported, "encode")
            texts, single = check_texts(texts)
            precision = "float32" if precision is None else precision
            output = st_names.resolve_output(output, convert_to_tensor, convert_to_numpy)
            normalize, normalize_after = st_names.resolve_normalize(normalize, normalize_embeddings)
            check_output_args(precision, output, ranges, calibration_embeddings)
            batch_size = check_positive(batch_size, "batch_size")
            max_tokens_per_batch = check_positive(max_tokens_per_batch, "max_tokens_per_batch")
            width = check_positive(dims, "dims") or self.embedding_dim
            truncate_dim = st_names.check_truncate_dim(truncate_dim, width)
            if truncate_dim is None and self.truncate_dim is not None:
                truncate_dim = st_names.check_truncate_dim(self.truncate_dim, width, "self.truncate_dim")
            prompt = self.resolve_prompt(instruction, prompt, prompt_name)
        except (TypeError, ValueError) as exc:
            if distributed:  # the other ranks wait in the first collective: they must hear of it
                from llmembed_fast.embedder.distributed import fail_everywhere

                fail_everywhere(self, exc)
            raise
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
        kw = dict(
            instruction=instruction,
            prompt=prompt,
            batch_size=batch_size,
            max_tokens_per_batch=max_tokens_per_batch,
            normalize=normalize,
            dims=dims,
            packed=packed,
            show_progress_bar=show_progress_bar,
        )
        if distributed:
            from llmembed_fast.embedder.distributed import encode_sharded

            emb = encode_sharded(self, texts, **kw)
            if emb is None:
                return None
        else:
            emb = self.encode_float(texts, **kw)
        if truncate_dim is not None:
            emb = emb[:, :truncate_dim]
        if normalize_after:
            emb = l2_normalize(emb)
        return self._finish(emb, precision, output, single, ranges, calibration_embeddings)

    def resolve_prompt(self, instruction=None, prompt=None, prompt_name=None) -> str | None:
        """The prompt prefix a call applies: ``prompt``, else ``self.prompts[prompt_name]`` ("query" and
        "document" are "" when not defined, as sentence-transformers' implicit prompts), else (no instruction
        either) the default prompt, ``self.prompts[self.default_prompt_name]``, if any."""
        if prompt is None and prompt_name is None and instruction is None:
            prompt_name = self.default_prompt_name
        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts and prompt_name in ("query", "document"):
                return ""  # sentence-transformers' implicit empty "query" / "document" prompts
            if prompt_name not in self.prompts:
                raise ValueError(
                    f"prompt_name {prompt_name!r} not in the model's prompts {sorted(self.prompts)}"
                )
            prompt = self.prompts[prompt_name]
        return prompt

    @staticmethod
    def _finish(emb: torch.Tensor, precision: str, output: str, single: bool, ranges, calibration_embeddings):
        if precision == "float16":
            emb = emb.half()
        elif precision in QUANTIZED:
            from llmembed_fast.quant import quantize

            if precision in ("int8", "uint8") and ranges is None and calibration_embeddings is None:
                if 1 < emb.shape[0] < MIN_CALIBRATION_ROWS:  # one row: quantize refuses it
                    _warn.warn(
                        f"precision={precision!r} calibrates its ranges on the embeddings being encoded, "
                        f"here {emb.shape[0]} rows (coarse codes on a scale no other call shares): "
                        "pass ranges= or calibration_embeddings= (e.g. "
                        "embeddings of a sample corpus)",
                        UserWarning,
                    )
            emb = quantize(emb, precision, ranges=ranges, calibration_embeddings=calibration_embeddings)
        if output == "numpy":
            emb = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
        elif not isinstance(emb, torch.Tensor):
            emb = torch.from_numpy(np.asarray(emb))
        return emb[0] if single else emb

    def _named_prompt(self, names) -> str | None:
        for n in names:
            if n in self.prompts:
                return self.prompts[n]
        return None

    def _use_named_prompt(self, kwargs: dict, names) -> None:
        """Sets ``kwargs["prompt"]`` to the first of ``names`` in the model's prompts, else to no prompt,
        unless the call gives a prompt or prompt_name (None counts as not given). As in sentence-transformers'
        encode_query / encode_document, the default prompt does not apply: it is for plain :meth:`encode`
        (a folder whose default prompt is its query prompt would put it on documents)."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
            kwargs.pop("prompt_name", None)
            prompt = self._named_prompt(names)
            kwargs["prompt"] = "" if prompt is None else prompt

    def encode_queries(self, texts, *, instruction: str | None = None, **kwargs):
        """:meth:`encode` for queries: the instruction if given, else the model's "query" prompt (else none).
        Alias: ``encode_query`` (sentence-transformers' name)."""
        if instruction is None:
            self._use_named_prompt(kwargs, ("query",))
        return self.encode(texts, instruction=instruction, **kwargs)

    def encode_documents(self, texts, **kwargs):
        """:meth:`encode` for documents: no instruction; the model's "document", "passage" or "corpus" prompt,
        the first it has (else none). Alias: ``encode_document`` (sentence-transformers' name; its 6.x
        picks an implicit empty "document" prompt before "passage", we follow its documented order)."""
        self._use_named_prompt(kwargs, _DOC_PROMPT_NAMES)
        return self.encode(texts, **kwargs)

    encode_query = encode_queries
    encode_document = encode_documents

    def encode_late_chunks(self, text: str, chunks, **kwargs):
        """One forward over ``text``, one embedding per chunk (:func:`.late_chunking.encode_late_chunks`)."""
        from llmembed_fast.embedder.late_chunking import encode_late_chunks

        return encode_late_chunks(self, text, chunks, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"pooling={self.pooling!r}, normalize={self.normalize}, dims={self.dims}, "
            f"max_length={self.max_length}, style={self.style.name!r}, add_eos={self.add_eos}, "
            f"padding_side={self.padding_side!r}, include_prompt={self.include_prompt}"
        )


ChunkSpec = Sequence[tuple[int, int]] | Sequence[str] | Callable[[str], Sequence]
