"""Pass 2, fuse norms: fold RMSNorm gains into the linears that read the norm's output.

RMSNorm(h) = h / rms(h) * g, so  W @ RMSNorm(h) = (W diag(g)) @ (h / rms(h)).
The gains become ones. The final norm folds into lm_head, which unties tied
embeddings (lm_head.weight is then written as its own tensor).
"""
from __future__ import annotations

import torch

from .state import ModelState, Part


def apply(state: ModelState, part: Part) -> None:
    t = part.tensors
    if part.name == "head":
        g = t["model.norm.weight"]
        t["lm_head.weight"].mul_(g.to(t["lm_head.weight"].dtype))  # in place: lm_head can be large
        t["model.norm.weight"] = torch.ones_like(g)
        return
    i = part.layer
    if i is None:
        return
    pre = f"model.layers.{i}"
    for norm, readers in (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ):
        g = t[f"{pre}.{norm}.weight"]
        for r in readers:
            t[f"{pre}.{r}.weight"] = t[f"{pre}.{r}.weight"] * g
        t[f"{pre}.{norm}.weight"] = torch.ones_like(g)
