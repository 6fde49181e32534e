"""Pass 7, quantize: int4 weights for every decoder linear: the clip rule picks the
scales (weighted by input saliency with --saliency act, or by the per-weight Fisher
with --saliency fisher), then round-to-nearest, or GPTQ (--gptq) with the Hessian the
calibration passes collected. With --refine sde the weight is first refined
(refine.py: W' = U(Σ+Δ)Vᵀ, kept only if it helps on held-out windows); the clip rule,
RTN/GPTQ then work on W'.

`X.weight` [out, M] becomes `X.weight_packed` int32 [out, M/8] and
`X.weight_scale` float32 [out, 1] (per channel) or [out, M/group] (per group).
Embeddings, norms and lm_head stay in float. Setup also resolves --act-clip (the
activation rule the checkpoint declares; it changes no weight).
"""
from __future__ import annotations

import torch

from ..format import SCHEMES, linear_names
from ..quant import dequantize_weight, pack_int4, quantize_weight, unpack_int4
from . import fisher, refine
from .clip import choose_scale
from .gptq import gptq_quantize
from .state import ConvertError, ModelState, Part

# --act-clip default per scheme: the per-token activation clip ratio written as activations.clip
# (measured on SmolLM2-135M, docs/accuracy.md "Activation clip"); int8 activations are not clipped
ACT_CLIP_DEFAULT = {"w4a4": 0.75, "w4a8": 1.0}


def act_clip_of(options) -> float:
    """The activation clip ratio a conversion with these options declares (1.0: none, or no quantized activations)."""
    if SCHEMES.get(options.scheme, (None, None))[1] is None:
        return 1.0
    return ACT_CLIP_DEFAULT[options.scheme] if options.act_clip is None else float(options.act_clip)


def setup(state: ModelState) -> None:
    scheme = state.options.scheme
    if scheme not in SCHEMES:
        raise ConvertError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    g = state.options.group_size
    state.group_size = SCHEMES[scheme][0] if g is None else g
    c = state.options.act_clip
    if c is not None and SCHEMES[scheme][1] is None and scheme != "none":
        raise ConvertError(f"--act-clip {c}: scheme {scheme} does not quantize activations")
    state.act_clip = act_clip_of(state.options)
    if not 0 < state.act_clip <= 1:
        raise ConvertError(f"--act-clip {c}: must be in (0, 1]")
    if scheme == "none":
        state.group_size = 0
        return
    if state.group_size < 0 or state.group_size % 8:
        raise ConvertError(f"--group-size {state.group_size}: must be 0 (per channel) or a multiple of 8")
    g = state.group_size
    if g and state.options.clip == "kl-j":  # clip.py: sqrt(g) bins, thresholds from bin 9 on
        n = max(int(g**0.5), 9) - 8
        state.report["notes"].append(
            f"--clip kl-j with --group-size {g}: {n} candidate threshold(s) per group"
            + (" (only absmax: the same scales as --clip none)" if n == 1 else "") + "; --clip mse searches finer"
        )
    if g and state.options.clip == "kl":
        state.report["notes"].append(
            f"--clip kl with --group-size {g}: a histogram of {g} weights per group is too coarse and its clips "
            "come out too tight (SmolLM2-135M w4a16 g64: perplexity 459 vs 39 with --clip mse); prefer --clip mse"
        )
    for name, width in _input_widths(state):
        spec = state.online.get(name)
        if spec and spec.blocks > 1 and state.group_size and spec.block_size % state.group_size:
            raise ConvertError(f"{name}: block width {spec.block_size} is not a multiple of --group-size {state.group_size}")
        if width % 8:
            raise ConvertError(f"{name}: input width {width} is not a multiple of 8 (int4 packing)")
        if state.group_size and width % state.group_size:
            raise ConvertError(
                f"{name}: input width {width} is not a multiple of --group-size {state.group_size}; "
                f"pick a group size that divides it (e.g. 64) or 0 for per channel"
            )


def _input_widths(state: ModelState):
    c = state.config
    hidden = state.hidden
    attn = int(c["num_attention_heads"]) * state.head_dim
    widths = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": attn,
              "gate_proj": hidden, "up_proj": hidden, "down_proj": int(c["intermediate_size"])}
    for i in range(state.num_layers):
        for name in linear_names(i):
            spec = state.online.get(name)
            yield name, spec.size if spec else widths[name.rsplit(".", 1)[1]]


# --sequential: the groups of a layer quantized one after another, each group's Hessians taken
# from the layer with the earlier groups already quantized (Brevitas's block-sequential GPTQ)
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def apply(state: ModelState, part: Part) -> None:
    if part.layer is None or state.options.scheme == "none":
        return
    fisher_imp = fisher.layer_importance(state, part.layer) if state.options.saliency == "fisher" else {}
    names = linear_names(part.layer)
    if not (state.options.sequential and state.options.gptq and state.calib_x is not None):
        for name in names:
            _quantize_linear(state, part, name, fisher_imp)
        return
    from .calibrate import capture_hessians

    weights = {n: part.tensors[f"{n}.weight"].float() for n in names}
    for group in SEQUENTIAL_GROUPS:
        members = [n for n in names if n.rsplit(".", 1)[1] in group]
        capture_hessians(state, part, weights, members)
        for name in members:
            _quantize_linear(state, part, name, fisher_imp)
            t = part.tensors
            weights[name] = dequantize_weight(unpack_int4(t[f"{name}.weight_packed"]), t[f"{name}.weight_scale"], state.group_size)


def _quantize_linear(state: ModelState, part: Part, name: str, fisher_imp: dict) -> None:
    g = state.group_size
    w = part.tensors.pop(f"{name}.weight").float()
    o = state.options
    h = part.hessians.pop(name, None)
    held = part.heldout.pop(name, None)
    importance = torch.diagonal(h) if h is not None and o.saliency == "act" else fisher_imp.pop(name, None)
    wq, info = w, None
    if o.refine != "none" and h is not None and held is not None:
        wq, info = refine.apply(state, w, h, held, importance)  # W' (or W if the held-out check rejects it)
    scale = choose_scale(wq, g, o.clip, importance)
    if h is not None and o.gptq:
        q = gptq_quantize(wq, h, scale, g, act_order=o.act_order, damp=o.damp)
    else:
        q = quantize_weight(wq, scale, g)
    err = (dequantize_weight(q, scale, g) - w).norm() / w.norm().clamp_min(1e-30)
    part.tensors[f"{name}.weight_packed"] = pack_int4(q)
    part.tensors[f"{name}.weight_scale"] = scale
    entry = {"name": name, "out_features": w.shape[0], "in_features": w.shape[1],
             "rel_weight_error": round(err.item(), 6)}  # against W, also when W' was quantized
    if info is not None:
        entry["refine"] = info
    state.report["layers"].append(entry)
