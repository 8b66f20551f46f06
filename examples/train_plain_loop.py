#!/usr/bin/env python3
"""Contrastive training with gradient caching in a plain PyTorch loop (CPU, tiny model, < 1 minute).

A randomly initialized 2-layer Qwen2-shaped model learns to match a "query" (a bag of token ids) with its
"document" (the same tokens shuffled, plus noise tokens) among 127 in-batch negatives, embedding only 16
rows at a time. Prints the held-out loss and top-1 accuracy before and after.

    python examples/train_plain_loop.py [--steps 40] [--batch 128] [--chunk 16]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import llmembed_fast as lf

VOCAB, Q_LEN, D_LEN = 256, 8, 12


def synthetic_pairs(n: int, gen: torch.Generator) -> tuple[dict, dict]:
    """Queries: Q_LEN random tokens; documents: the same tokens shuffled plus noise, right-padded."""
    q = torch.randint(1, VOCAB, (n, Q_LEN), generator=gen)
    noise = torch.randint(1, VOCAB, (n, D_LEN - Q_LEN), generator=gen)
    d = torch.cat([q, noise], 1)
    d = torch.gather(d, 1, torch.rand(n, D_LEN, generator=gen).argsort(1))
    lengths = torch.randint(Q_LEN, D_LEN + 1, (n,), generator=gen)  # some noise tokens become padding
    d_mask = (torch.arange(D_LEN)[None] < lengths[:, None]).long()
    q_mask = torch.ones_like(q)
    return {"input_ids": q, "attention_mask": q_mask}, {"input_ids": d * d_mask, "attention_mask": d_mask}


class Encoder(nn.Module):
    """Any Hugging Face model + masked mean pooling -> [b, hidden] embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
        return lf.pool(hidden, batch["attention_mask"], "mean")


def tiny_qwen2(seed: int = 0) -> nn.Module:
    from transformers import AutoModel, Qwen2Config

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=0.1, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModel.from_config(cfg, attn_implementation="eager")


@torch.no_grad()
def evaluate(encoder: nn.Module, q: dict, d: dict, temperature: float) -> tuple[float, float]:
    encoder.eval()
    qe, de = encoder(q), encoder(d)
    loss = lf.contrastive_loss(qe, de, temperature=temperature).item()
    sims = nn.functional.normalize(qe, dim=-1) @ nn.functional.normalize(de, dim=-1).T
    acc = (sims.argmax(1) == torch.arange(len(qe))).float().mean().item()
    encoder.train()
    return loss, acc


def train(steps: int = 40, batch: int = 128, chunk: int = 16, lr: float = 2e-3, temperature: float = 0.05,
          seed: int = 0, log=print) -> dict:
    """Returns {"before": (loss, acc), "after": (loss, acc), "losses": [training loss per step]}."""
    gen = torch.Generator().manual_seed(seed)
    encoder = Encoder(tiny_qwen2(seed)).train()
    eval_q, eval_d = synthetic_pairs(256, torch.Generator().manual_seed(seed + 1))
    before = evaluate(encoder, eval_q, eval_d, temperature)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr)
    gc = lf.GradCache(encoder, lf.contrastive_loss, chunk_size=chunk)
    losses = []
    for step in range(steps):
        q, d = synthetic_pairs(batch, gen)
        loss = gc.step(q, d, temperature=temperature)  # gradients are in encoder's .grad now
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:3d}  loss {loss.item():.3f}")
    after = evaluate(encoder, eval_q, eval_d, temperature)
    return {"before": before, "after": after, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128, help="contrastive batch (queries per step)")
    ap.add_argument("--chunk", type=int, default=16, help="rows embedded at once")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # tiny matmuls: more threads mostly contend
    t = time.perf_counter()
    out = train(args.steps, args.batch, args.chunk)
    (lb, ab), (la, aa) = out["before"], out["after"]
    print(f"held-out loss {lb:.3f} -> {la:.3f}, top-1 accuracy {ab:.1%} -> {aa:.1%} "
          f"({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
