"""Template rendering, exact prompt/text token boundaries, truncation and EOS rules (no model runs)."""

import pytest
from tiny_models import make_tokenizer

from llmembed_fast.embedder.batching import pack_batch, pad_batch, plan_batches
from llmembed_fast.embedder.prompts import PROMPT_STYLES, compose, get_style, render
from llmembed_fast.embedder.tokenize import TokenizerInfo, _keep_counts, probe_tokenizer, tokenize_texts


@pytest.fixture(scope="module")
def qwen_tok():
    return make_tokenizer("qwen2")


@pytest.fixture(scope="module")
def llama_tok():
    return make_tokenizer("llama")


def test_render_and_compose():
    s, spans = render("Rewrite: {text}\nAgain: {text}", "a {b}")
    assert s == "Rewrite: a {b}\nAgain: a {b}"
    assert [s[a:b] for a, b in spans] == ["a {b}", "a {b}"]
    t = compose('X "{text}"', "find {it}", "Instruct: {instruction}\nQuery: {text}")
    assert t == 'Instruct: find {it}\nQuery: X "{text}"'
    with pytest.raises(ValueError, match="instruction"):
        compose("{text}", "bad {text}", None)
    with pytest.raises(ValueError, match="prompt_style"):
        get_style("no slot here")
    assert get_style("echo").pool_copy == 1 and get_style("prompteol").add_eos is False
    assert set(PROMPT_STYLES) >= {"none", "instruct", "qwen3", "prompteol", "pcot", "ke", "echo"}


def test_probe_detects_eos_and_bos():
    assert probe_tokenizer(make_tokenizer("qwen2")) == TokenizerInfo(False, False, 0, 0, True)
    info = probe_tokenizer(make_tokenizer("llama", add_eos=True))
    assert info.adds_bos and info.adds_eos
    info = probe_tokenizer(make_tokenizer("llama"))
    assert info.adds_bos and not info.adds_eos and info.pad_id == info.eos_id  # no pad token: any valid id
    bert = make_tokenizer("bert")
    assert probe_tokenizer(bert).eos_suffix == (bert.sep_token_id,)  # [SEP] is its terminator


def test_boundary_merge_located_exactly(qwen_tok):
    """Byte-level BPE merges the space of "Query: " into the text's first token: counting the prompt's own
    tokens (what sentence-transformers' prompt_length does) would pool one text token less."""
    info = probe_tokenizer(qwen_tok)
    text = "the cat"
    tok = tokenize_texts(
        qwen_tok, info, [text], "query: {text}", include_prompt=False, return_text_spans=True
    )
    ids, start = tok.ids[0], tok.pool_starts[0]
    assert qwen_tok.decode(ids[start:]) == " the cat"
    prompt_len = len(qwen_tok("query: ")["input_ids"])
    assert prompt_len == start + 1  # the naive count is off by one here
    ((ts, te),) = tok.text_spans[0]
    assert (ts, te) == (start, len(ids))
    # include_prompt pools everything; no prompt pools everything too (BOS included, as sentence-transformers)
    assert tokenize_texts(qwen_tok, info, [text], "query: {text}", include_prompt=True).pool_starts == [0]
    assert tokenize_texts(qwen_tok, info, [text], "{text}", include_prompt=False).pool_starts == [0]


def test_slow_fallback_matches_offsets_and_refuses_inside_token(llama_tok):
    info = probe_tokenizer(llama_tok)
    slow = TokenizerInfo(info.adds_bos, info.adds_eos, info.eos_id, info.pad_id, fast=False)
    texts = ["hello world", "the river bank", ""]
    template = "passage:\n{text}\nend"
    fast = tokenize_texts(llama_tok, info, texts, template, include_prompt=False, return_text_spans=True)
    slow_t = tokenize_texts(llama_tok, slow, texts, template, include_prompt=False, return_text_spans=True)
    assert fast.ids == slow_t.ids and fast.pool_starts == slow_t.pool_starts
    assert fast.text_spans == slow_t.text_spans
    with pytest.raises(ValueError, match="slow tokenizer"):
        tokenize_texts(llama_tok, slow, ["hello"], "query: {text}", include_prompt=False)


@pytest.mark.parametrize("style", ["prompteol", "pcot", "ke"])
def test_truncation_cuts_text_only_and_keeps_eos(llama_tok, style):
    info = probe_tokenizer(llama_tok)
    tmpl = PROMPT_STYLES[style].template
    text = " ".join(["model embedding vector search"] * 30)
    full = tokenize_texts(llama_tok, info, [text], tmpl, add_eos=True, return_text_spans=True)
    n_fixed = len(full.ids[0]) - (full.text_spans[0][0][1] - full.text_spans[0][0][0])
    for max_length in (n_fixed + 1, n_fixed + 7, len(full.ids[0]) - 1):
        tr = tokenize_texts(
            llama_tok, info, [text], tmpl, add_eos=True, max_length=max_length, return_text_spans=True
        )
        ids = tr.ids[0]
        assert len(ids) == max_length
        assert ids[-1] == info.eos_id and ids[0] == llama_tok.bos_token_id
        ((ts, te),) = tr.text_spans[0]
        ((fts, fte),) = full.text_spans[0]
        assert ids[:ts] == full.ids[0][:fts]  # template prefix intact
        assert ids[te:] == full.ids[0][fte:]  # template suffix + EOS intact
        assert ids[ts:te] == full.ids[0][fts : fts + (te - ts)]  # the text's first tokens
    with pytest.raises(ValueError, match="max_length"):
        tokenize_texts(llama_tok, info, [text], tmpl, add_eos=True, max_length=n_fixed - 1)


def test_truncation_keeps_template_chars_merged_into_the_text(llama_tok):
    """Byte-level BPE merges the text's end with the template's start ('wor' + 'ld' -> 'Ġworld'): that
    token holds template characters, so truncation must not cut it with the text."""
    info = probe_tokenizer(llama_tok)
    tmpl, text = "query: {text}ld is here", "hello " * 6 + "wor"
    full = tokenize_texts(llama_tok, info, [text], tmpl)
    assert llama_tok.convert_ids_to_tokens(full.ids[0])[-5] == "Ġworld"  # the merge this test is about
    for max_length in range(9, len(full.ids[0])):
        ids = tokenize_texts(llama_tok, info, [text], tmpl, max_length=max_length).ids[0]
        s = llama_tok.decode(ids, skip_special_tokens=True)
        assert len(ids) == max_length and s.startswith("query: hello") and s.endswith("hellold is here")
    with pytest.raises(ValueError, match="max_length"):  # "query: ld is here" alone takes 9 tokens
        tokenize_texts(llama_tok, info, [text], tmpl, max_length=8)


def test_eos_not_doubled_when_tokenizer_adds_it():
    tok = make_tokenizer("llama", add_eos=True)
    info = probe_tokenizer(tok)
    out = tokenize_texts(tok, info, ["hello world"] * 2, add_eos=True, max_length=4)
    assert out.ids[0][-1] == info.eos_id and out.ids[0][-2] != info.eos_id and len(out.ids[0]) == 4


def test_echo_truncates_both_copies_and_pools_second(qwen_tok):
    info = probe_tokenizer(qwen_tok)
    style = PROMPT_STYLES["echo"]
    text = "the cat sat on the river bank with a dog"
    full = tokenize_texts(
        qwen_tok, info, [text], style.template, pool_copy=1, include_prompt=False, return_text_spans=True
    )
    (a0, b0), (a1, b1) = full.text_spans[0]
    assert full.pool_starts[0] == a1 and b1 == len(full.ids[0])
    assert (
        full.ids[0][a0 + 1 : b0] == full.ids[0][a1 + 1 : b1]
    )  # same text tokens (first may differ by the space)
    tr = tokenize_texts(
        qwen_tok,
        info,
        [text],
        style.template,
        pool_copy=1,
        include_prompt=False,
        max_length=len(full.ids[0]) - 5,
        return_text_spans=True,
    )
    (c0, d0), (c1, d1) = tr.text_spans[0]
    # both copies hold the same cut text: 3 tokens off each (5 would split the copies unevenly)
    assert (d0 - c0) == (d1 - c1) and (b0 - a0) + (b1 - a1) - (d0 - c0) - (d1 - c1) == 6
    assert tr.ids[0][c0 + 1 : d0] == tr.ids[0][c1 + 1 : d1] == full.ids[0][a0 + 1 : b0 - 3]
    assert tr.pool_starts[0] == c1


def test_keep_counts():
    assert _keep_counts([10], 3) == [7]
    k = _keep_counts([10, 10], 5)
    assert sum(k) == 15 and max(k) - min(k) <= 1
    assert _keep_counts([2, 10], 6) == [2, 4]


def test_empty_text(qwen_tok, llama_tok):
    info = probe_tokenizer(llama_tok)
    out = tokenize_texts(llama_tok, info, ["", "x"], "query:\n{text}", include_prompt=False, add_eos=True)
    assert out.ids[0][0] == llama_tok.bos_token_id and out.ids[0][-1] == info.eos_id
    assert out.pool_starts[0] == len(out.ids[0]) - 1  # only EOS is pooled
    out = tokenize_texts(qwen_tok, probe_tokenizer(qwen_tok), [""])
    assert out.ids == [[]] and out.pool_starts == [0]


def test_plan_batches_budget_and_cover():
    lengths = [5, 100, 7, 50, 50, 1, 300, 2]
    plan = plan_batches(lengths, max_tokens=200, batch_size=3)
    seen = sorted(i for b in plan for i in b)
    assert seen == list(range(len(lengths)))
    for b in plan:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 200
    assert [lengths[i] for i in plan[0]] == [300]
    # a few long sequences do not pad many short ones once a batch is big enough
    skewed = [118, 109, 64] + [30] * 40
    plan = plan_batches(skewed, max_tokens=8192, min_tokens=256)
    assert sorted(i for b in plan for i in b) == list(range(len(skewed)))
    padded = sum(len(b) * max(skewed[i] for i in b) for b in plan)
    assert padded <= 1.1 * sum(skewed)
    assert len(plan_batches(skewed, max_tokens=8192, max_waste=None)) == 1


def test_pad_and_pack_masks():
    seqs, starts = [[5, 6, 7], [8], [9, 10]], [1, 0, 2]
    for side in ("left", "right"):
        b = pad_batch(seqs, starts, pad_id=0, padding_side=side, pad_to_multiple_of=4)
        assert b["input_ids"].shape == (3, 4)
        assert b["attention_mask"].sum(1).tolist() == [3, 1, 2]
        assert b["pool_mask"].sum(1).tolist() == [2, 1, 0]
        for r, s in enumerate(seqs):
            m = b["attention_mask"][r].bool()
            assert b["input_ids"][r][m].tolist() == s
            assert b["position_ids"][r][m].tolist() == list(range(len(s)))
    p = pack_batch(seqs, starts)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p["starts"].tolist() == [1, 3, 6] and p["ends"].tolist() == [3, 4, 6]


def test_pad_batch_sides():
    """padding_side="left" puts the pads first (the layout tokenize() hands to a caller's own model)."""
    b = pad_batch([[1, 2, 3], [4]], [0, 0], pad_id=9, padding_side="left")
    assert b["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    b = pad_batch([[1, 2, 3], [4]], [0, 0], pad_id=9, padding_side="right")
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]


def test_plan_batches_token_budget_alone():
    """With max_waste=None the token budget alone bounds each batch: rows x width <= max_tokens."""
    plan = plan_batches([10] * 10, max_tokens=35, max_waste=None)
    assert sorted(i for b in plan for i in b) == list(range(10))
    assert [len(b) for b in plan] == [3, 3, 3, 1]
