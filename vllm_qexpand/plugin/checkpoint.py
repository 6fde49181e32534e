"""Pre-flight check of a qexpand checkpoint directory, from the safetensors headers only.

vLLM leaves a tensor that is missing from the checkpoint uninitialised (``torch.empty``)
and only notices a truncated shard when it reaches it, after the engine has started
its workers. ``check_checkpoint`` reads ``config.json`` and every shard's header (a few
KiB, no tensor data) and raises :class:`~vllm_qexpand.format.FormatError` naming the
offending file or tensor. ``QExpandConfig.maybe_update_config`` runs it in the API
process before any engine process is spawned; the worker checks again while loading
(``QExpandLinearMethod.process_weights_after_loading``).

No vLLM import here: this module is plain Python + the format contract.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..format import FormatError, QExpandSpec, linear_names

_INT = {"I32"}
_FLOAT = {"F32", "F16", "BF16", "F64"}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file; FormatError if unreadable or truncated."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise FormatError(f"{path}: truncated safetensors file ({size} bytes, header claims {n})")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise FormatError(f"{path}: not a readable safetensors file (bad header: {e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise FormatError(f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + n + end})")
    header.pop("__metadata__", None)
    return header


def linear_shapes(cfg: dict, spec: QExpandSpec) -> dict[str, tuple[int, int]]:
    """HF linear name -> (out, M) with M the expanded input width, for Llama/Mistral/Qwen2 configs."""
    hidden = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or hidden // heads)
    base = {
        "self_attn.q_proj": (heads * hd, hidden),
        "self_attn.k_proj": (kv * hd, hidden),
        "self_attn.v_proj": (kv * hd, hidden),
        "self_attn.o_proj": (hidden, heads * hd),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    out = {}
    for i in range(int(cfg["num_hidden_layers"])):
        for name in linear_names(i):
            o, n = base[name.split(".", 3)[3]]
            online = spec.online.get(name)
            if online is not None:
                if online.in_features != n:
                    raise FormatError(
                        f"quantization_config.online[{name!r}].in_features is {online.in_features}; the model's is {n}"
                    )
                n = online.size
            out[name] = (o, n)
    return out


def expected_tensors(cfg: dict, spec: QExpandSpec) -> dict[str, tuple[set, tuple[int, ...]]]:
    """Tensor name -> (allowed safetensors dtypes, shape) for every decoder linear."""
    want = {}
    for name, (o, m) in linear_shapes(cfg, spec).items():
        if not spec.quantized:
            want[f"{name}.weight"] = (_FLOAT, (o, m))
            continue
        if m % 8:
            raise FormatError(f"{name}: input width {m} is not a multiple of 8 (int4 packing)")
        want[f"{name}.weight_packed"] = (_INT, (o, m // 8))
        g = spec.group_size
        if g and m % g:
            raise FormatError(f"{name}: input width {m} is not a multiple of group_size {g}")
        want[f"{name}.weight_scale"] = (_FLOAT, (o, m // g if g else 1))
    return want


def check_checkpoint(path: str | Path, spec: QExpandSpec | None = None) -> dict[str, Path]:
    """Validate a local qexpand dir; returns tensor name -> shard. Raises FormatError naming the culprit."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if spec is None:
        spec = QExpandSpec.from_config(cfg.get("quantization_config"))
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    files = sorted(path.glob("*.safetensors"))
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        wmap = json.loads(index_file.read_text()).get("weight_map", {})
        for shard in sorted(set(wmap.values())):
            if not (path / shard).exists():
                some = next(k for k, v in wmap.items() if v == shard)
                raise FormatError(f"{path / shard}: shard listed in model.safetensors.index.json is missing (holds {some})")
    if not files:
        raise FormatError(f"{path}: no *.safetensors files")
    where: dict[str, Path] = {}
    info: dict[str, dict] = {}
    for f in files:
        for name, meta in read_header(f).items():
            where[name] = f
            info[name] = meta
    for name, (dtypes, shape) in expected_tensors(cfg, spec).items():
        if name not in info:
            raise FormatError(f"{path}: tensor {name} is missing from the checkpoint")
        meta = info[name]
        if meta["dtype"] not in dtypes:
            raise FormatError(f"{where[name].name}: tensor {name} has dtype {meta['dtype']}, expected one of {sorted(dtypes)}")
        if tuple(meta["shape"]) != shape:
            raise FormatError(f"{where[name].name}: tensor {name} has shape {meta['shape']}, expected {list(shape)}")
    layers = int(cfg["num_hidden_layers"])
    others = ["model.embed_tokens.weight", "model.norm.weight"]
    others += [f"model.layers.{i}.{n}.weight" for i in range(layers) for n in ("input_layernorm", "post_attention_layernorm")]
    if not cfg.get("tie_word_embeddings", False):
        others.append("lm_head.weight")
    for name in others:
        if name not in info:
            raise FormatError(f"{path}: tensor {name} is missing from the checkpoint")
    return where
