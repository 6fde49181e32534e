"""Pass 8, write: HF-layout safetensors shards, config.json, tokenizer files, report.

Everything is written into a temporary directory beside DST and renamed at the end,
so a failed conversion leaves nothing behind and never a half-written DST.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..format import make_quant_config
from .state import ModelState, Part

# tokenizer and generation files copied as they are (never *.bin / *.pt: no pickle)
COPY_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def shard_name(state: ModelState, part: str) -> str:
    names = state.part_names()
    return f"model-{names.index(part) + 1:05d}-of-{len(names):05d}.safetensors"


def make_tmpdir(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def apply(state: ModelState, part: Part, tmp: Path, index: dict) -> None:
    out = {}
    for name, t in part.tensors.items():
        if t.is_floating_point() and not name.endswith(".weight_scale"):
            t = t.to(state.out_dtype)
        out[name] = t.contiguous()
    fname = shard_name(state, part.name)
    save_file(out, str(tmp / fname), metadata={"format": "pt"})
    for name in out:
        index[name] = fname
    part.tensors.clear()


def finalize(state: ModelState, tmp: Path, dst: Path, index: dict, report: dict) -> None:
    total = sum((tmp / f).stat().st_size for f in set(index.values()))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2) + "\n"
    )
    config = dict(state.config)
    config["tie_word_embeddings"] = False
    config["torch_dtype"] = str(state.out_dtype).replace("torch.", "")
    config.pop("dtype", None)
    if "rope_theta" not in config and isinstance(config.get("rope_parameters"), dict):
        theta = config["rope_parameters"].get("rope_theta")
        if theta is not None:
            config["rope_theta"] = theta  # older vLLM/transformers read only the top-level key
    config["quantization_config"] = make_quant_config(
        state.options.scheme, state.group_size, state.online, state.r1, state.r2, state.options.clip, state.act_clip
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in COPY_FILES:
        if (state.src / f).is_file():
            shutil.copyfile(state.src / f, tmp / f)
    (tmp / "qexpand_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if dst.exists():  # only reached with --force
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


def param_counts(state: ModelState) -> tuple[int, int]:
    """(linear parameters before, after expansion) over decoder linears and lm_head."""
    c = state.config
    h, i, hd = state.hidden, int(c["intermediate_size"]), state.head_dim
    nh, nkv = int(c["num_attention_heads"]), int(c.get("num_key_value_heads") or c["num_attention_heads"])
    vocab = int(c["vocab_size"])
    per_layer = h * hd * (nh + 2 * nkv) + nh * hd * h + 3 * h * i
    before = state.num_layers * per_layer + vocab * h
    extra = sum(
        (spec.size - spec.in_features) * (h if name.endswith("down_proj") or name.endswith("o_proj") else 0)
        for name, spec in state.online.items()
    )
    return before, before + extra


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
