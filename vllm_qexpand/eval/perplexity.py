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


def perplexity(model, token_ids: list[int], window: int = 512, max_tokens: int | None = 8192,
               progress: bool = True) -> dict:
    """``model``: a torch causal LM (``input_ids`` -> logits), or any scorer with
    ``token_logprobs(ids)`` (``eval.zeroshot.HFScorer``, ``eval.served.ServedScorer``)."""
    if isinstance(model, torch.nn.Module):
        from .zeroshot import HFScorer

        model = HFScorer(model)
    nll, count = 0.0, 0
    chunks = windows(token_ids, window, max_tokens)
    for chunk in tqdm(chunks, desc="perplexity", unit="window", disable=not progress):
        logprobs = model.token_logprobs(chunk)
        if len(logprobs) != len(chunk) - 1:
            raise ValueError(f"scorer returned {len(logprobs)} log-probs for a window of {len(chunk)} tokens")
        nll -= math.fsum(logprobs)
        count += len(chunk) - 1
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "window": window, "windows": len(chunks)}
