"""Pass 1, load: check the source checkpoint and read one part at a time."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..format import ATTN_LINEARS, MLP_LINEARS
from .state import ConvertError, ModelState, Part, ShardReader

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_config(src: Path) -> dict:
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{src}: no config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON ({e})") from None
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(
            f"{src}: architecture {', '.join(archs) or '(none)'} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("quantization_config"):
        raise ConvertError(f"{src}: already quantized ({config['quantization_config'].get('quant_method')})")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(key), int):
            raise ConvertError(f"{path}: missing or non-integer {key!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{path}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
    return config


def setup(state: ModelState) -> None:
    state.reader = ShardReader(state.src)
    cfg = state.config
    name = state.options.dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if name not in _DTYPES:
        raise ConvertError(f"unsupported dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    state.out_dtype = _DTYPES[name]
    expected = set(_expected_names(state))
    present = set(state.reader.names())
    missing = sorted(expected - present)
    if missing:
        raise ConvertError(f"{state.src}: tensor {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = sorted(present - expected - set(_optional_names(state)))
    if unknown:
        raise ConvertError(f"{state.src}: unexpected tensor {unknown[0]!r}; not a plain {cfg['architectures'][0]} checkpoint")
    for n in expected:
        if not state.reader.dtype(n).startswith(("F", "BF")):
            raise ConvertError(f"{state.src}: tensor {n!r} has dtype {state.reader.dtype(n)}; expected a float checkpoint")


def _expected_names(state: ModelState):
    yield "model.embed_tokens.weight"
    yield "model.norm.weight"
    if not state.tied:
        yield "lm_head.weight"
    for i in range(state.num_layers):
        yield from _layer_weight_names(i)


def _layer_weight_names(i: int):
    pre = f"model.layers.{i}"
    yield f"{pre}.input_layernorm.weight"
    yield f"{pre}.post_attention_layernorm.weight"
    for n in ATTN_LINEARS:
        yield f"{pre}.self_attn.{n}.weight"
    for n in MLP_LINEARS:
        yield f"{pre}.mlp.{n}.weight"


def _optional_names(state: ModelState):
    if state.tied:
        yield "lm_head.weight"
    for i in range(state.num_layers):
        pre = f"model.layers.{i}"
        for n in ATTN_LINEARS:
            yield f"{pre}.self_attn.{n}.bias"
        for n in MLP_LINEARS:
            yield f"{pre}.mlp.{n}.bias"


def read_part(state: ModelState, name: str) -> Part:
    """All source tensors of one part: float64 for decoder layers, float32 for the
    (large) embedding and lm_head parts, which are rotated in float64 row chunks."""
    r = state.reader
    if name == "embed":
        return Part(name, {"model.embed_tokens.weight": r.get("model.embed_tokens.weight").float()})
    if name == "head":
        tensors = {"model.norm.weight": r.get("model.norm.weight").double()}
        src = "model.embed_tokens.weight" if state.tied else "lm_head.weight"
        tensors["lm_head.weight"] = r.get(src).float()
        return Part(name, tensors)
    pre = f"model.layers.{name.split('.')[1]}."
    names = [n for n in r.names() if n.startswith(pre)]
    return Part(name, {n: r.get(n).double() for n in names})
