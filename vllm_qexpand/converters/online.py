"""Passes 5 and 6: online rotations and their expansion, then their fusion into weights.

- ``plan_online``: every layer named by --online (down_proj, o_proj) gets an online
  Hadamard of its own width N (spec size = N).
- ``plan_expand``: Franco et al. expansion. For each --expand PATTERN=VALUE, the
  matching online layers grow to size M: VALUE < N means VALUE steps of the size
  rule (hadamard.next_size), otherwise VALUE is M itself.
- ``apply_online``: W [out, N] -> T_M([W | 0]) row-wise, i.e. pad(W) @ A.T; at run
  time the plugin computes x' = T_M([x | 0]) so x' @ W'.T = x @ W.T exactly.
"""
from __future__ import annotations

import re

import torch

from ..format import OnlineSpec
from ..hadamard import EXPANSION_K, KNOWN_K, factor, hadamard_transform, next_size
from .state import ConvertError, ModelState, Part


def _online_modules(state: ModelState) -> dict:
    widths = {
        "down_proj": ("mlp.down_proj", int(state.config["intermediate_size"])),
        "o_proj": ("self_attn.o_proj", int(state.config["num_attention_heads"]) * state.head_dim),
    }
    out = {}
    for kind in state.options.online:
        if kind not in widths:
            raise ConvertError(f"--online {kind}: only down_proj and o_proj take an online rotation")
        sub, n = widths[kind]
        for i in range(state.num_layers):
            out[f"model.layers.{i}.{sub}"] = n
    return out


def plan_online(state: ModelState) -> None:
    for name, n in _online_modules(state).items():
        kp = factor(n)
        if kp is None:
            raise ConvertError(
                f"{name}: input width {n} has no Hadamard (needs K·2^p, K in {KNOWN_K}); "
                f"expand it with --expand {name.rsplit('.', 1)[1]}=1 or leave it out of --online"
            )
        state.online[name] = OnlineSpec(n, n, kp[0])


def plan_expand(state: ModelState) -> None:
    for pattern, value in state.options.expand:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConvertError(f"--expand {pattern}={value}: bad pattern ({e})") from None
        hits = [name for name in state.online if rx.search(name)]
        if not hits:
            raise ConvertError(
                f"--expand {pattern}={value}: matches no layer with an online rotation "
                f"(online layers come from --online; now: {','.join(state.options.online) or 'none'})"
            )
        for name in hits:
            n = state.online[name].in_features
            m = next_size(n, value, multiple=8) if value < n else value
            kp = factor(m)
            if kp is None or (kp[0] not in EXPANSION_K and kp[0] != 1):
                raise ConvertError(f"--expand {pattern}={value}: {name}: size {m} is not K·2^p with K in {EXPANSION_K}")
            if m % 8:
                raise ConvertError(f"--expand {pattern}={value}: {name}: size {m} is not a multiple of 8")
            state.online[name] = OnlineSpec(n, m, kp[0])


def apply_online(state: ModelState, part: Part) -> None:
    if part.layer is None:
        return
    for name, spec in state.online.items():
        key = f"{name}.weight"
        if key not in part.tensors:
            continue
        w = part.tensors[key]
        if spec.size > spec.in_features:
            w = torch.nn.functional.pad(w, (0, spec.size - spec.in_features))
        part.tensors[key] = hadamard_transform(w, spec.k)
