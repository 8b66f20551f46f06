"""Template rendering, truncation and the pooled region, token-exact.

Each text is rendered into its template and tokenized once, as the model will see it. The tokenizer's
offset mapping (fast tokenizers) says which tokens overlap each copy of the text; a token that straddles
the prompt/text boundary (byte-level BPE merges ``' hello'`` across ``"Query: " + "hello"``) counts as
text. Nothing is re-tokenized piecewise, so the boundary cannot drift by a token the way
``len(tokenize(prompt))`` does. Slow tokenizers fall back to tokenizing the prefix and checking that its
tokens are a prefix of the full sequence.

Rules:
- truncation removes text only (from its end), never template characters or special tokens. With a fast
  tokenizer a text that is too long is cut at a token boundary (from the offsets) and rendered and
  tokenized again, so a token merged across the text/template boundary (``'."'``) is never dropped and
  every copy holds the same cut text. The cut falls between characters, so where one character takes
  several tokens (byte-level BPE on emoji or CJK) the sequence may end up to that many tokens minus one
  short of ``max_length``. A slow tokenizer (no offsets) loses whole text tokens from the end
  of each copy, evenly across copies. The template and specials must fit in ``max_length``.
- EOS is appended after everything when ``add_eos`` and the tokenizer does not already add a terminator
  (any special token it appends, e.g. Qwen3-Embedding's ``<|endoftext|>``); ``strip_eos`` drops the
  terminator the tokenizer appends (prompting styles that read the state after the prompt).
- the pooled region of a sequence is ``[pool_start, len)``: everything, or (``include_prompt=False`` and a
  non-empty prompt before the pooled copy) from the first token of the pooled copy of the text to the end.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from llmembed_fast.embedder.prompts import TEXT, render


@dataclass(frozen=True)
class TokenizerInfo:
    """What the tokenizer adds around a text, found by tokenizing a probe."""

    adds_bos: bool
    adds_eos: bool
    eos_id: int | None
    pad_id: int
    fast: bool
    eos_suffix: tuple[int, ...] = ()  # the special tokens the tokenizer appends after the text


def probe_tokenizer(tokenizer) -> TokenizerInfo:
    """Detect whether ``tokenizer`` adds BOS/EOS itself (never guessed from names or from pad == eos).

    Any special token(s) it appends after the text count as its terminator (``adds_eos``), whether or not
    they are ``eos_token`` (Qwen3-Embedding appends ``<|endoftext|>``, its pad token)."""
    enc = tokenizer("a b", add_special_tokens=True, return_special_tokens_mask=True)
    with_sp = list(enc["input_ids"])
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    bos = getattr(tokenizer, "bos_token_id", None)
    n_trail = 0
    if len(with_sp) > len(plain):
        mask = enc.get("special_tokens_mask")
        if mask is not None:
            n_trail = min(_leading_specials(list(mask)[::-1]), len(with_sp) - len(plain))
        elif eos is not None and with_sp[-1] == eos and (not plain or plain[-1] != eos):
            n_trail = 1
    eos_suffix = tuple(int(t) for t in with_sp[len(with_sp) - n_trail :]) if n_trail else ()
    adds_eos = bool(eos_suffix)
    adds_bos = (
        bos is not None and len(with_sp) > len(plain) and with_sp[0] == bos and (not plain or plain[0] != bos)
    )
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else 0  # any valid id: padded positions are masked everywhere
    fast = bool(getattr(tokenizer, "is_fast", False))
    return TokenizerInfo(adds_bos, adds_eos, eos, int(pad), fast, eos_suffix)


@dataclass
class Tokenized:
    """Token ids (no padding) and the first pooled position of each sequence."""

    ids: list[list[int]]
    pool_starts: list[int]
    text_spans: list[list[tuple[int, int]]] | None = None  # token [start, end) of each text copy, if asked

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


def _text_token_ranges(offsets, special, spans) -> list[tuple[int, int]]:
    """Token index ranges [ts, te) of the non-special tokens overlapping each char span [a, b).

    An empty span gets the empty range at the first token after its position."""
    ns = [i for i, s in enumerate(special) if not s]
    ends = [offsets[i][1] for i in ns]
    starts = [offsets[i][0] for i in ns]
    after = ns[-1] + 1 if ns else _leading_specials(special)  # insertion point past the last text token

    def index(k: int) -> int:
        return ns[k] if k < len(ns) else after

    out = []
    for a, b in spans:
        k = bisect.bisect_right(ends, a)  # first token ending after a
        j = k if b == a else max(k, bisect.bisect_left(starts, b))  # first token starting at/after b
        out.append((index(k), index(j)))
    return out


def _leading_specials(special) -> int:
    n = 0
    for s in special:
        if not s:
            break
        n += 1
    return n


def _slow_token_ranges(
    tokenizer, rendered: str, spans, full_plain: list[int], lead: int
) -> list[tuple[int, int]]:
    """Fallback without offsets: count the tokens of each prefix and check they prefix the full sequence."""
    out = []
    for a, b in spans:
        idx = []
        for c in (a, b):
            p = tokenizer(rendered[:c], add_special_tokens=False)["input_ids"]
            if full_plain[: len(p)] != p:
                raise ValueError(
                    "cannot locate the text tokens exactly with this slow tokenizer (the prompt/text "
                    "boundary falls inside a token); load the fast tokenizer (tokenizer.json) instead"
                )
            idx.append(lead + len(p))
        out.append((idx[0], idx[1]))
    return out


def _keep_counts(lengths: list[int], excess: int) -> list[int]:
    """Text tokens to keep per copy so that sum(len - keep) >= excess, cutting the longest copies first."""
    total = sum(lengths)
    budget = total - excess
    lo, hi = 0, max(lengths)
    while lo < hi:  # largest t with sum(min(len, t)) <= budget
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    keep = [min(n, lo) for n in lengths]
    spare = budget - sum(keep)
    for i, n in enumerate(lengths):  # hand back what the even cut over-removed
        add = min(spare, n - keep[i])
        keep[i] += add
        spare -= add
    return keep


def _encode(tokenizer, rendered, offsets: bool):
    return tokenizer(
        list(rendered),
        add_special_tokens=True,
        return_special_tokens_mask=True,
        return_offsets_mapping=offsets,
        return_attention_mask=False,
        truncation=False,
        padding=False,
        verbose=False,
    )


def _cut_point(text: str, base: int, offsets, rng: tuple[int, int], drop: int) -> int:
    """Characters of ``text`` to keep so that its copy at char ``base`` (tokens ``rng``) loses ``drop``
    tokens: the end of the last kept token, always < len(text) so that every round shortens the text."""
    ts, te = rng
    keep = te - ts - drop
    if keep <= 0 or not text:
        return 0
    a, b = offsets[ts + keep - 1]
    cut = b - base
    if cut >= len(text):  # tokens sharing a character (bytes of one code point): drop that character
        cut = a - base
    return max(0, min(cut, len(text) - 1))


def tokenize_texts(
    tokenizer,
    info: TokenizerInfo,
    texts: list[str],
    template: str = TEXT,
    *,
    pool_copy: int = 0,
    include_prompt: bool = True,
    max_length: int | None = None,
    add_eos: bool = False,
    strip_eos: bool = False,
    return_text_spans: bool = False,
) -> Tokenized:
    """Render, tokenize and truncate ``texts``; see the module docstring for the rules.

    Returns token ids (specials included, no padding) and each sequence's first pooled position.
    Raises ValueError when ``max_length`` cannot hold the template and special tokens.
    """
    texts = list(texts)
    rendered, spans = zip(*(render(template, t) for t in texts), strict=True) if texts else ((), ())
    rendered, spans = list(rendered), list(spans)
    n_copies = template.count(TEXT)
    bare = template == TEXT and not return_text_spans
    append_eos = bool(add_eos) and not info.adds_eos and info.eos_id is not None
    suffix = list(info.eos_suffix) if strip_eos else []
    limit = None if max_length is None else max_length - int(append_eos)
    if limit is not None and limit < 1:
        raise ValueError(f"max_length must leave room for at least one token, got {max_length}")
    use_offsets = info.fast and not bare
    enc = _encode(tokenizer, rendered, use_offsets)
    rows = [
        (
            enc["input_ids"][i],
            enc["special_tokens_mask"][i],
            enc["offset_mapping"][i] if use_offsets else None,
        )
        for i in range(len(texts))
    ]
    cut_again = use_offsets and limit is not None  # fast tokenizers re-render cut texts (see module doc)
    pending = list(range(len(texts)))
    out_ids, starts, out_spans = [None] * len(texts), [0] * len(texts), [None] * len(texts)
    while pending:
        retry = []
        for i in pending:
            ids, special, offsets = rows[i]
            if suffix and len(ids) > len(suffix) and list(ids[-len(suffix) :]) == suffix:
                n = len(ids) - len(suffix)
                ids, special = ids[:n], special[:n]
                offsets = offsets[:n] if offsets is not None else None
            if bare:
                lead = _leading_specials(special)
                trail = _leading_specials(special[::-1]) if len(ids) > lead else 0
                ranges = [(lead, len(ids) - trail)]
            elif use_offsets:
                ranges = _text_token_ranges(offsets, special, spans[i])
            else:
                lead = _leading_specials(special)
                plain = [t for t, s in zip(ids, special, strict=True) if not s]
                ranges = _slow_token_ranges(tokenizer, rendered[i], spans[i], plain, lead)
            n = len(ids)
            if limit is not None and n > limit and cut_again:
                if not texts[i]:
                    raise ValueError(
                        f"max_length={max_length} is too small: the template and special tokens alone "
                        f"take {n + int(append_eos)} tokens"
                    )
                drop = -(-(n - limit) // max(1, n_copies))
                texts[i] = texts[i][: _cut_point(texts[i], spans[i][0][0], offsets, ranges[0], drop)]
                rendered[i], spans[i] = render(template, texts[i])
                retry.append(i)
                continue
            if limit is not None and n > limit:
                lens = [te - ts for ts, te in ranges]
                fixed = n - sum(lens)
                if fixed > limit:
                    raise ValueError(
                        f"max_length={max_length} is too small: the template and special tokens alone "
                        f"take {fixed + int(append_eos)} tokens"
                    )
                keep = _keep_counts(lens, n - limit)
                pieces, prev, shift, new_ranges = [], 0, 0, []
                for (ts, te), k in zip(ranges, keep, strict=True):
                    pieces.append(ids[prev : ts + k])
                    new_ranges.append((ts - shift, ts - shift + k))
                    shift += (te - ts) - k
                    prev = te
                pieces.append(ids[prev:])
                ids = [t for p in pieces for t in p]
                ranges = new_ranges
            else:
                ids = list(ids)
            if append_eos:
                ids.append(info.eos_id)
            has_prompt = spans[i][pool_copy][0] > 0 if n_copies else False
            starts[i] = 0 if include_prompt or not has_prompt else ranges[pool_copy][0]
            out_ids[i] = ids
            out_spans[i] = ranges
        if retry:
            enc = _encode(tokenizer, [rendered[i] for i in retry], True)
            for j, i in enumerate(retry):
                rows[i] = (enc["input_ids"][j], enc["special_tokens_mask"][j], enc["offset_mapping"][j])
        pending = retry
    return Tokenized(out_ids, starts, out_spans if return_text_spans else None)
