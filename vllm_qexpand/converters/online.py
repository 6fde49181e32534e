"""Passes 5 and 6: online rotations and their expansion, then their fusion into weights.

- ``plan_online``: every layer named by --online (down_proj, o_proj) gets an online
  Hadamard of its own width N (spec size = N).
- ``plan_expand``: Franco et al. expansion. For each --expand PATTERN=VALUE, the
  matching online layers grow to size M: VALUE < N means VALUE steps of the size
  rule (hadamard.next_size), otherwise VALUE is M itself.
- ``apply_online``: W [out, N] -> T_M([W | 0]) row-wise, i.e. pad(W) @ A.T; at run
  time the plugin computes x' = T_M([x | 0]) so x' @ W'.T = x @ W.T exactly.
  With --tp-blocks B the same happens per block of N/B inputs (quant.online_rotate).
"""
from __future__ import annotations

import re

import torch

from ..format import OnlineSpec
from ..hadamard import EXPANSION_K, KNOWN_K, factor, next_size
from ..quant import online_rotate
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
    b = state.options.tp_blocks
    if b < 1 or b & (b - 1):
        raise ConvertError(f"--tp-blocks {b}: must be a power of two (1, 2, 4, 8, ...)")
    for name, n in _online_modules(state).items():
        if n % b or (n // b) % 8:
            raise ConvertError(f"{name}: input width {n} does not split into --tp-blocks {b} blocks of a multiple of 8")
        kp = factor(n // b)
        if kp is None:
            raise ConvertError(
                f"{name}: input block width {n // b} has no Hadamard (needs K·2^p, K in {KNOWN_K}); "
                f"leave it out of --online or change --tp-blocks"
            )
        state.online[name] = OnlineSpec(n, n, kp[0], b)


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
            spec = state.online[name]
            b, n = spec.blocks, spec.block_in  # the size rule applies per block
            if value < spec.in_features:
                m = next_size(n, value, multiple=8)
            elif value % b:
                raise ConvertError(f"--expand {pattern}={value}: {name}: size is not a multiple of --tp-blocks {b}")
            else:
                m = value // b
            kp = factor(m)
            if kp is None or (kp[0] not in EXPANSION_K and kp[0] != 1):
                raise ConvertError(f"--expand {pattern}={value}: {name}: size {m * b} is not K·2^p with K in {EXPANSION_K}" + (f" per block of {b}" if b > 1 else ""))
            if m % 8:
                raise ConvertError(f"--expand {pattern}={value}: {name}: block size {m} is not a multiple of 8")
            state.online[name] = OnlineSpec(spec.in_features, m * b, kp[0], b)


def apply_online(state: ModelState, part: Part) -> None:
    if part.layer is None:
        return
    for name, spec in state.online.items():
        key = f"{name}.weight"
        if key not in part.tensors:
            continue
        part.tensors[key] = online_rotate(part.tensors[key], spec.size, spec.k, blocks=spec.blocks)
