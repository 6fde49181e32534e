"""Torch reference model: an HF dir, or a qexpand dir run with the exact quantized math.

The qexpand model is the transformers model of the same architecture whose decoder
linears are replaced by ``QLinear``: pad + online Hadamard (if any), dynamic
per-token activation quantization (if any), GEMM. With quantized activations (w4a4,
w4a8) the GEMM multiplies the int4 codes exactly and applies the scales afterwards
(`quant.qlinear_codes`), the formulation every serving layout computes bit for bit; w4a16
and scheme none multiply the dequantized float weight (`quant.qlinear`). This is what the
served model is compared with.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..format import QExpandSpec, linear_names
from ..hadamard import hadamard_k
from ..quant import dequantize_weight, qlinear, qlinear_codes, unpack_int4


class QLinear(torch.nn.Module):
    """One decoder linear of the reference. `codes`/`scale`: int4 codes and their scales (quantized
    activations: the integer-exact GEMM); `weight`: a float weight (w4a16 dequantized, or scheme none)."""

    def __init__(self, weight, bias, act_bits, rotation, *, codes=None, scale=None, group_size: int = 0,
                 act_clip: float = 1.0):
        super().__init__()
        # plain attributes, not buffers: they stay float32 whatever model.to(dtype) does
        self.weight = None if weight is None else weight.float()
        # codes as float32 once (exact integers): the GEMM would otherwise convert the int8 codes every call
        self.codes = None if codes is None else codes.float()
        self.scale, self.group_size = None if scale is None else scale.float(), group_size
        self.bias = None if bias is None else bias.float()
        self.act_bits, self.act_clip = act_bits, act_clip
        self.rotation = rotation
        self.hk = hadamard_k(rotation[1]).float() if rotation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.codes is not None:
            y = qlinear_codes(x, self.codes, self.scale, act_bits=self.act_bits, group_size=self.group_size,
                              rotation=self.rotation, hk=self.hk, act_clip=self.act_clip)  # fmt: skip
        else:
            y = qlinear(x, self.weight, act_bits=self.act_bits, rotation=self.rotation, hk=self.hk, act_clip=self.act_clip)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def _tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load an HF Llama-family dir or a qexpand dir as a torch causal LM in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qc = raw.get("quantization_config")
    if not qc or str(qc.get("quant_method", "")).lower() != "qexpand":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).eval()
    spec = QExpandSpec.from_config(qc)
    raw.pop("quantization_config")
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "model_type"}, model_type=raw["model_type"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _tensors(path)
    for i in range(config.num_hidden_layers):
        for name in linear_names(i):
            parent_name, attr = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            bias = tensors.pop(f"{name}.bias", None)
            online = spec.online.get(name)
            common = dict(bias=bias, act_bits=spec.act_bits, rotation=online.rotation if online else None,
                          act_clip=spec.act_clip)
            if spec.quantized:
                codes = unpack_int4(tensors.pop(f"{name}.weight_packed"))
                scale = tensors.pop(f"{name}.weight_scale").float()
                if spec.act_bits is not None:
                    layer = QLinear(None, codes=codes, scale=scale, group_size=spec.group_size, **common)
                else:
                    layer = QLinear(dequantize_weight(codes, scale, spec.group_size), **common)
            else:
                layer = QLinear(tensors.pop(f"{name}.weight").float(), **common)
            setattr(parent, attr, layer)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    # what is left to load: embeddings, norms, lm_head (QLinear buffers were set above)
    missing = [m for m in missing if not m.startswith(tuple(f"{n}." for i in range(config.num_hidden_layers) for n in linear_names(i)))]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(dtype).eval()
