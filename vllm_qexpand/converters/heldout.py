"""The held-out loss of the model a conversion would write, for choices made before converting.

``quantized_loss(state, ids)``: the mean next-token loss on `ids` of the model under the state's current
rotations (R1, R2, online specs with their expansion), with round-to-nearest int4 weights (the --clip rule,
the conversion's group size) and the scheme's activation quantization (--act-clip included). Streamed
part by part like the conversion (one decoder layer in float64 at a time, the hidden states of `ids`);
GPTQ, saliency and refinement are not modelled. Used by:

- --expand-budget (budget.py): keep the chosen expansion only if its loss is lower than unexpanded;
- --r1-candidates K (rotate.choose_r1): R1 is the sign draw with the lowest loss among K.

``heldout_tokens``: WINDOWS windows of the calibration text right after the --calib-samples windows
GPTQ calibrates on, so the choices are scored on text no calibration step has seen.
"""
from __future__ import annotations

import torch

from ..format import SCHEMES, linear_names
from . import calibrate, rotate
from .clip import rtn_weight
from .state import ModelState

WINDOWS = 4  # held-out windows of --calib-len tokens


def heldout_tokens(state: ModelState, flag: str) -> torch.Tensor:
    """The WINDOWS windows of --calib after the --calib-samples calibration windows ([WINDOWS, calib_len])."""
    return calibrate.tokens(state, flag, WINDOWS, state.options.calib_samples)


def quantized_loss(state: ModelState, ids: torch.Tensor) -> float:
    """Mean next-token loss (nats) on `ids` [windows, len] of the round-to-nearest model (module doc)."""
    act_bits = SCHEMES[state.options.scheme][1]
    act = None if act_bits is None else (act_bits, state.act_clip)
    g, saved = state.group_size, state.calib_x
    try:
        x = rotate.rotated_part(state, "embed").tensors["model.embed_tokens.weight"][ids].float()
        for i in range(state.num_layers):
            part = rotate.rotated_part(state, f"layer.{i}")
            weights = {}
            for n in linear_names(i):
                weights[n] = rtn_weight(part.tensors[f"{n}.weight"].float(), g, state.options.clip)
            state.calib_x = x
            x = calibrate._run(state, part, weights, None, act=act).float()
    finally:
        state.calib_x = saved
    head = rotate.rotated_part(state, "head").tensors["lm_head.weight"].float()  # final norm gain folded in
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(state.config.get("rms_norm_eps", 1e-6)))
    logits = x[:, :-1] @ head.t()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
