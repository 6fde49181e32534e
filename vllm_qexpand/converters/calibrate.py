"""Calibration passes for GPTQ, saliency and refinement (--gptq / --saliency act / --refine,
with --calib FILE),
block-sequential like the rest.

- ``setup``: tokenize the calibration text into `calib_samples` windows of `calib_len` tokens.
- ``embed`` part: the hidden states start as the rotated embeddings of those tokens.
- ``collect`` (layer parts, before quantize): run the rotated float decoder layer on the
  hidden states and accumulate, for every linear, the Hessian 2XᵀX/n of its actual input
  (after the online rotation and expansion for online layers); with --refine also the
  Hessian of the held-out windows alone (the last `calib_heldout` windows).
- ``propagate`` (after quantize): run the quantized layer to get the next layer's input.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from ..format import linear_names
from ..quant import dequantize_weight, unpack_int4
from .gptq import hessian
from .state import ConvertError, ModelState, Part

_LAYERS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
SALIENCY = ("none", "act", "fisher")


BUILTIN_CALIB = "built-in: Jane Austen's Emma and Mansfield Park (eval.data.CALIBRATION_BOOKS)"


def builtin_calibration_file() -> Path:
    """The built-in calibration text as a file in the data cache (made once): the calibration books
    of eval/data.py (Debian's r-cran-janeaustenr; never the evaluation book)."""
    from ..eval.data import calibration_text, default_cache_dir

    path = default_cache_dir() / "austen" / "calibration-books.txt"
    if not path.is_file():
        try:
            text = calibration_text()
        except Exception as e:  # no apt / no network: say what to do instead
            raise ConvertError(f"the built-in calibration text is not available ({e}); pass --calib FILE "
                               "(any plain text in the model's language) or --rtn") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.rename(path)
    return path


def setup(state: ModelState) -> None:
    o = state.options
    if o.saliency not in SALIENCY:
        raise ConvertError(f"--saliency {o.saliency!r}: choose one of {', '.join(SALIENCY)}")
    needs = (o.gptq or o.saliency != "none" or o.refine != "none" or o.expand_budget is not None or o.learn_rotation
             or o.r1_candidates > 1)
    if o.calib is None and o.calib_builtin and needs and o.scheme != "none":
        o.calib = builtin_calibration_file()
        state.report["calibration"] = {"text": BUILTIN_CALIB, "file": str(o.calib)}
    elif o.calib is not None and needs:
        state.report["calibration"] = {"text": str(o.calib)}
    if "calibration" in state.report:
        state.report["calibration"].update(windows=o.calib_samples, tokens_per_window=o.calib_len)
    # --saliency fisher alone needs no Hessians: converters/fisher.py tokenizes for itself
    if not (o.gptq or o.saliency == "act" or o.refine != "none"):
        return
    flag = "--gptq" if o.gptq else "--refine" if o.refine != "none" else "--saliency"
    if o.calib is None or not o.calib.is_file():
        raise ConvertError(f"{flag} needs a calibration text file (--calib); got {o.calib}")
    if o.scheme == "none":
        raise ConvertError(f"{flag} and --no-quant exclude each other")
    state.calib_ids = tokens(state, flag)


def tokens(state: ModelState, flag: str, windows: int | None = None, skip: int = 0) -> torch.Tensor:
    """The calibration windows [calib_samples, calib_len] of --calib (`flag` names who needs them); or
    `windows` windows after the first `skip` ones (e.g. held out: the windows after the calibration ones)."""
    o = state.options
    if o.calib is None or not o.calib.is_file():
        raise ConvertError(f"{flag} needs a calibration text file (--calib); got {o.calib}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(state.src)
    ids = tok(o.calib.read_text(encoding="utf-8"))["input_ids"]
    n = o.calib_samples if windows is None else windows
    need = (skip + n) * o.calib_len
    if len(ids) < need:
        what = "--calib-samples × --calib-len" if not skip else f"{flag}'s {skip} + {n} windows of --calib-len"
        raise ConvertError(f"{o.calib}: {len(ids)} tokens, fewer than {what} = {need}")
    return torch.tensor(ids[skip * o.calib_len:need]).reshape(n, o.calib_len)


def _layer_module(state: ModelState):
    from transformers import AutoConfig

    mt = state.config["model_type"]
    if mt not in _LAYERS:
        raise ConvertError(f"--gptq: model_type {mt!r} has no calibration support")
    cfg = AutoConfig.for_model(**{k: v for k, v in state.config.items() if k not in ("quantization_config",)})
    cfg._attn_implementation = "sdpa"
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    layer = getattr(mod, f"{_LAYERS[mt]}DecoderLayer")(cfg, 0).float().eval()
    rotary = getattr(mod, f"{_LAYERS[mt]}RotaryEmbedding")(cfg)
    return layer, rotary


def embed(state: ModelState, part: Part) -> None:
    if state.calib_ids is not None and part.name == "embed":
        state.calib_x = part.tensors["model.embed_tokens.weight"][state.calib_ids].float()


def _run(state: ModelState, part: Part, weights: dict, capture: dict | None, only: set | None = None,
         act: tuple | None = None) -> torch.Tensor:
    """The decoder layer of `part` with `weights` on state.calib_x; `act` = (bits, clip): the activations
    fake-quantized as the checkpoint does (default: float activations)."""
    from ..eval.reference import QLinear

    if state.calib_layer is None:
        state.calib_layer = _layer_module(state)
    layer, rotary = state.calib_layer
    pre = f"model.layers.{part.layer}."
    t = part.tensors
    bits, clip = act or (None, 1.0)
    for name in linear_names(part.layer):
        spec = state.online.get(name)
        ql = QLinear(weights[name], t.get(f"{name}.bias"), bits, spec.rotation if spec else None, act_clip=clip)
        if capture is not None and (only is None or name in only):
            ql.register_forward_pre_hook(lambda m, args, name=name: capture.setdefault(name, []).append(args[0]))
        parent, attr = name[len(pre):].rsplit(".", 1)
        setattr(layer.get_submodule(parent), attr, ql)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        getattr(layer, norm).weight.data = t[f"{pre}{norm}.weight"].float()
    x = state.calib_x
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    with torch.no_grad():
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rotary(x, pos))
    return out[0] if isinstance(out, tuple) else out


def collect(state: ModelState, part: Part) -> None:
    if state.calib_x is None or part.layer is None:
        return
    if state.options.gptq and state.options.sequential:
        return  # quantize asks for each group's Hessians in turn (capture_hessians)
    weights = {n: part.tensors[f"{n}.weight"].float() for n in linear_names(part.layer)}
    capture_hessians(state, part, weights, linear_names(part.layer))


def capture_hessians(state: ModelState, part: Part, weights: dict, names) -> None:
    """Run the layer with `weights` (float activations) and store, for each linear in `names`, the
    Hessian 2XᵀX/n of its actual input in part.hessians (and the held-out windows' in part.heldout)."""
    captured: dict = {}
    _run(state, part, weights, captured, only=set(names))
    seen: dict = {}  # q/k/v (and gate/up) read the very same tensor: one Hessian for them
    for name, xs in captured.items():
        spec = state.online.get(name)
        key = (tuple(a.data_ptr() for a in xs), spec)
        if key in seen:
            part.hessians[name] = seen[key][0]
            if seen[key][1] is not None:
                part.heldout[name] = seen[key][1]
            continue
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in xs])
        if spec:
            from ..quant import online_rotate

            x = online_rotate(x.double(), spec.size, spec.k, blocks=spec.blocks)
        part.hessians[name] = hessian(x)
        if state.calib_heldout:  # --refine: the last windows are held out (rows are window-major)
            part.heldout[name] = hessian(x[x.shape[0] - x.shape[0] * state.calib_heldout // state.options.calib_samples:])
        seen[key] = (part.hessians[name], part.heldout.get(name))


def propagate(state: ModelState, part: Part) -> None:
    if state.calib_x is None or part.layer is None:
        return
    t, g = part.tensors, state.group_size
    weights = {
        n: dequantize_weight(unpack_int4(t[f"{n}.weight_packed"]), t[f"{n}.weight_scale"], g)
        for n in linear_names(part.layer)
    }
    state.calib_x = _run(state, part, weights, None).float()
