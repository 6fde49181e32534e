"""The one model state the converter passes work on, and the parts it streams."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open


class ConvertError(Exception):
    """A conversion that cannot go on; the message names the offending input."""


@dataclass
class Options:
    scheme: str = "w4a4"
    group_size: int | None = None  # None: the scheme's default
    clip: str = "mse"
    act_clip: float | None = None  # per-token activation clip ratio; None: the scheme's (ACT_CLIP_DEFAULT)
    online: tuple = ("down_proj",)
    expand: list = field(default_factory=list)  # [(pattern, int)]: steps if < width, else a size
    expand_budget: float | None = None  # --expand-budget F: choose expansions within +F linear params (needs --calib)
    seed: int | None = None
    r1_candidates: int = 1  # --r1-candidates K: R1 = the best of K sign draws by held-out loss (rotate.choose_r1)
    dtype: str | None = None  # float tensors out; None = the source's torch_dtype
    r1: bool = True
    r2: bool = True
    tp_blocks: int = 1  # online rotations block-diagonal in this many blocks (TP sizes dividing it)
    gptq: bool = False
    saliency: str = "none"  # "act": clip search weighted by E[x^2] of the inputs; "fisher": by the
    # per-weight Fisher diagonal E_window[(dL/dW)^2] of the float model's loss (both need --calib)
    refine: str = "none"  # "sde": singular-value refinement (CQE+ SDE/LSI) per linear (needs --calib)
    refine_steps: int = 20
    refine_lr: float = 2e-3
    refine_band: int = 0  # 0: diagonal increments (LSI); b > 0: b off-diagonals each side (SDE)
    refine_heldout: float = 0.25  # fraction of the calibration windows held out for the keep/reject check
    calib: Path | None = None  # calibration text for --gptq
    calib_builtin: bool = False  # calib None: use the built-in text (calibrate.BUILTIN_CALIB); the CLI sets it
    calib_samples: int = 16  # the CLI default too (cli.DEFAULT_CALIB_SAMPLES)
    calib_len: int = 512
    act_order: bool = True
    sequential: bool = True  # --sequential: GPTQ group by group inside a layer (q/k/v, o, gate/up, down)
    damp: float = 0.01
    learn_rotation: bool = False  # --learn-rotation: R1 learned by Cayley SGD with int4 fake quantization (learn.py)
    learn_steps: int = 100
    learn_lr: float = 1.5
    learn_batch: int = 1  # calibration windows (of calib_len tokens) per step
    learn_weights: str = "rtn"  # weights in the loop: "rtn" (fake-quantized as the conversion rounds) or "float"
    rotation: Path | None = None  # --rotation FILE: R1 written by an earlier --learn-rotation
    force: bool = False
    progress: bool = True


@dataclass
class Part:
    """A slice of the model processed at once: 'embed', 'layer.<i>' or 'head'."""

    name: str
    tensors: dict  # HF tensor name -> tensor (float64 while transformed)
    hessians: dict = field(default_factory=dict)  # linear name -> 2XᵀX/n (with --gptq)
    heldout: dict = field(default_factory=dict)  # linear name -> 2XᵀX/n of the held-out windows (--refine)

    @property
    def layer(self) -> int | None:
        return int(self.name.split(".")[1]) if self.name.startswith("layer.") else None


class ShardReader:
    """Lazy, name-addressed access to a directory of safetensors shards."""

    def __init__(self, src: Path):
        files = sorted(src.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = f" (found {', '.join(pickles)}: pickle files are never read)" if pickles else ""
            raise ConvertError(f"{src}: no *.safetensors files{hint}")
        self.where: dict[str, Path] = {}
        for f in files:
            self._check_size(f)
            try:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        self.where[k] = f
            except Exception as e:  # safetensors raises its own error types
                raise ConvertError(f"{f}: not a readable safetensors file ({e})") from None

    @staticmethod
    def _check_size(path: Path) -> None:
        # header length (8 bytes) + header + the largest data end offset must fit in the file
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ConvertError(f"{path}: truncated safetensors file ({size} bytes)")
            try:
                header = json.loads(fh.read(n))
            except ValueError as e:
                raise ConvertError(f"{path}: not a readable safetensors file (bad header: {e})") from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < 8 + n + end:
            raise ConvertError(f"{path}: truncated safetensors file ({path.stat().st_size} bytes, needs {8 + n + end})")

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConvertError(f"tensor {name!r} is missing from the checkpoint")
        with safe_open(self.where[name], framework="pt") as h:
            return h.get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        with safe_open(self.where[name], framework="pt") as h:
            return h.get_slice(name).get_dtype()


@dataclass
class ModelState:
    src: Path
    config: dict
    options: Options
    reader: ShardReader | None = None
    out_dtype: torch.dtype = torch.float32
    r1: dict | None = None  # {"kind", "size", "seed", "k"}
    r1_matrix: torch.Tensor | None = None  # float64 [hidden, hidden]; h' = h @ r1_matrix
    r1_signs: torch.Tensor | None = None  # ±1 [hidden] when R1 = diag(signs) @ A.T
    r2: dict | None = None
    r2_matrix: torch.Tensor | None = None  # float64 [head_dim, head_dim]
    online: dict = field(default_factory=dict)  # module name -> OnlineSpec
    group_size: int = 0
    act_clip: float = 1.0  # the resolved --act-clip (quantize.setup), written as activations.clip
    calib_ids: torch.Tensor | None = None  # [samples, len] calibration tokens (--gptq)
    calib_x: torch.Tensor | None = None  # hidden states entering the current layer
    calib_layer: tuple | None = None  # (decoder layer module, rotary embedding), built once
    calib_heldout: int = 0  # --refine: calibration windows held out (the last ones), 0 = none
    fisher_dir: object = None  # --saliency fisher: TemporaryDirectory holding the per-layer Fisher
    report: dict = field(default_factory=lambda: {"layers": [], "notes": []})

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def part_names(self) -> list[str]:
        return ["embed"] + [f"layer.{i}" for i in range(self.num_layers)] + ["head"]
