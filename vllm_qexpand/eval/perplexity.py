"""Perplexity protocol (docs/accuracy.md): tokenize the whole text, keep the first
`max_tokens` tokens, split into non-overlapping windows of `window` tokens (a
shorter last window is dropped), score every token after the first of each window,
and exponentiate the token-weighted mean negative log-likelihood.
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm


def windows(token_ids: list[int], window: int = 512, max_tokens: int | None = 8192) -> list[list[int]]:
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    out = [ids[s : s + window] for s in range(0, len(ids) - window + 1, window)]
    if not out:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, token_ids: list[int], window: int = 512, max_tokens: int | None = 8192,
               progress: bool = True) -> dict:
    nll, count = 0.0, 0
    chunks = windows(token_ids, window, max_tokens)
    for chunk in tqdm(chunks, desc="perplexity", unit="window", disable=not progress):
        ids = torch.tensor([chunk])
        logits = model(ids).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll -= logp.gather(1, ids[0, 1:].unsqueeze(1)).sum().item()
        count += len(chunk) - 1
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "window": window, "windows": len(chunks)}
