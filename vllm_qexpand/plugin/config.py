"""`QExpandConfig`: the vLLM quantization config registered as "qexpand".

Built by vLLM from the checkpoint's ``config.json`` ``quantization_config`` (parsed and
validated by :class:`vllm_qexpand.format.QExpandSpec`, so an unknown version, scheme or
bit width is one ``FormatError`` naming the field). The object holds plain Python data
only (the raw dict plus a few ints/tuples): vLLM pickles it from the API process to the
engine core and the workers.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..format import QUANT_METHOD, FormatError, QExpandSpec

logger = logging.getLogger(__name__)


@register_quantization_config(QUANT_METHOD)
class QExpandConfig(QuantizationConfig):
    """Rotated, expanded int4 checkpoints (docs/format.md)."""

    def __init__(self, quantization_config: dict | None = None):
        super().__init__()
        if quantization_config is None:
            raise FormatError(
                "qexpand needs the checkpoint's quantization_config (config.json); "
                "this directory has none — convert the model with `qexpand convert` first"
            )
        spec = QExpandSpec.from_config(quantization_config)
        self.raw: dict = copy.deepcopy(quantization_config)
        self.scheme: str = spec.scheme
        self.group_size: int = spec.group_size
        self.act_bits: int | None = spec.act_bits
        self.act_clip: float = spec.act_clip  # per-token activation scale = (max|x| * act_clip) / qmax
        # HF module name -> (in_features, size, k, blocks): plain tuples, picklable
        self.online: dict[str, tuple[int, int, int, int]] = {
            name: (s.in_features, s.size, s.k, s.blocks) for name, s in spec.online.items()
        }
        self.ignore: list[str] = list(quantization_config.get("ignore") or [])

    # ---- vLLM QuantizationConfig interface -------------------------------------------
    def __repr__(self) -> str:
        return f"QExpandConfig(scheme={self.scheme}, group_size={self.group_size}, online={len(self.online)} layers)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QExpandConfig":
        return cls(config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim qexpand checkpoints (so `--quantization` is optional); None for every other checkpoint."""
        if isinstance(hf_quant_cfg, dict) and str(hf_quant_cfg.get("quant_method", "")).lower() == QUANT_METHOD:
            return QUANT_METHOD
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: unquantized / vLLM defaults
        if self.is_ignored(prefix):
            return UnquantizedLinearMethod()
        from .linear import QExpandLinearMethod

        return QExpandLinearMethod(self, prefix)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Pre-flight: validate a local checkpoint dir from its headers before any engine process starts."""
        path = Path(model_name)
        if not (path / "config.json").is_file():
            return  # a hub id: vLLM downloads later; the worker-side checks still apply
        from .checkpoint import check_checkpoint

        check_checkpoint(path, QExpandSpec.from_config(self.raw))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Also index online specs under vLLM's module names (identical for Llama-family models)."""
        for name in list(self.online):
            try:
                mapped = hf_to_vllm_mapper._map_name(name)
            except Exception:  # noqa: BLE001 - mapper internals differ between vLLM versions
                mapped = None
            if mapped and mapped != name:
                self.online.setdefault(mapped, self.online[name])

    # ---- helpers used by QExpandLinearMethod ------------------------------------------
    def shard_names(self, prefix: str) -> list[str]:
        """HF module names behind a (possibly fused) vLLM layer prefix, e.g. qkv_proj -> q/k/v_proj."""
        parent, _, last = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(last)
        if not shards:
            return [prefix]
        return [f"{parent}.{s}" if parent else s for s in shards]

    def is_ignored(self, prefix: str) -> bool:
        names = self.shard_names(prefix)
        hits = [any(n == ig or n.endswith("." + ig) for ig in self.ignore) for n in names]
        if any(hits) and not all(hits):
            raise FormatError(f"quantization_config.ignore lists only some shards of fused layer {prefix}: {names}")
        return bool(hits) and all(hits)

    def online_for(self, prefix: str) -> tuple[int, int, int, int] | None:
        """The online rotation (in_features, size, k, blocks) of a layer, None if it has none."""
        specs = {self.online.get(n) for n in self.shard_names(prefix)} | {self.online.get(prefix)}
        specs.discard(None)
        if not specs:
            return None
        if len(specs) > 1 or any(self.online.get(n) is None for n in self.shard_names(prefix) if n != prefix):
            raise FormatError(f"quantization_config.online: the shards of fused layer {prefix} need one common spec")
        return specs.pop()
