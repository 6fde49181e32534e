"""The qexpand checkpoint contract: config schema, tensor names, validation.

docs/format.md is the prose version of this module; keep them in step.
"""
from __future__ import annotations

from dataclasses import dataclass

# version 2 = version 1 + `activations.clip` (a per-token activation clip ratio below 1). A writer
# writes 1 whenever the checkpoint has no clip (clip 1.0), so it stays readable by version-1 readers.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
QUANT_METHOD = "qexpand"

# scheme -> (weight group size default, activation bits or None)
SCHEMES = {
    "w4a4": (0, 4),
    "w4a8": (0, 8),
    "w4a16": (128, None),
    "none": (None, None),  # --no-quant: float weights, online rotations only
}

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
ONLINE_CHOICES = ("down_proj", "o_proj")


class FormatError(ValueError):
    """A qexpand config or checkpoint that does not follow docs/format.md."""


def linear_names(layer: int) -> list[str]:
    pre = f"model.layers.{layer}"
    return [f"{pre}.self_attn.{n}" for n in ATTN_LINEARS] + [f"{pre}.mlp.{n}" for n in MLP_LINEARS]


@dataclass(frozen=True)
class OnlineSpec:
    """Online rotation of one layer's input: zero-pad in_features -> size, then T_size (K = k).

    With blocks = B > 1 the rotation is block-diagonal: each of B input blocks of
    in_features/B is padded to size/B and rotated by T_{size/B}; the layer then serves at
    any tensor-parallel size that divides B.
    """

    in_features: int
    size: int
    k: int
    blocks: int = 1

    @property
    def block_in(self) -> int:
        return self.in_features // self.blocks

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    def to_dict(self) -> dict:
        return {"in_features": self.in_features, "size": self.size, "k": self.k, "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict, name: str) -> "OnlineSpec":
        try:
            spec = cls(int(d["in_features"]), int(d["size"]), int(d["k"]), int(d.get("blocks", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"quantization_config.online[{name!r}]: bad entry {d!r} ({e})") from None
        b = spec.blocks
        if b < 1 or spec.in_features % b or spec.size % b:
            raise FormatError(f"quantization_config.online[{name!r}]: blocks {b} does not divide in_features and size")
        if spec.block_size < spec.block_in or spec.k < 1 or spec.block_size % spec.k:
            raise FormatError(f"quantization_config.online[{name!r}]: size {spec.size} is not B·K·2^p >= in_features")
        p = spec.block_size // spec.k
        if p & (p - 1):
            raise FormatError(f"quantization_config.online[{name!r}]: size/(blocks·k) = {p} is not a power of two")
        return spec

    @property
    def rotation(self) -> tuple[int, int, int]:
        """(size, k, blocks): the argument of quant.qlinear / quant.online_rotate."""
        return (self.size, self.k, self.blocks)


@dataclass(frozen=True)
class QExpandSpec:
    """Parsed `quantization_config` of a qexpand checkpoint."""

    scheme: str
    weight_bits: int
    group_size: int  # 0 = per output channel
    act_bits: int | None
    online: dict  # module name -> OnlineSpec
    raw: dict
    act_clip: float = 1.0  # activations.clip: per-token scale = (max|x| * act_clip) / qmax

    @classmethod
    def from_config(cls, qc: dict) -> "QExpandSpec":
        if not isinstance(qc, dict):
            raise FormatError("quantization_config must be a JSON object")
        method = str(qc.get("quant_method", "")).lower()
        if method != QUANT_METHOD:
            raise FormatError(f"quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}")
        version = qc.get("format_version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise FormatError(
                f"quantization_config.format_version is {version!r}; this vllm-qexpand reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}"
            )
        scheme = qc.get("scheme")
        if scheme not in SCHEMES:
            raise FormatError(f"quantization_config.scheme is {scheme!r}; known: {sorted(SCHEMES)}")
        weights = qc.get("weights") or {}
        acts = qc.get("activations")
        act_clip = 1.0
        if scheme == "none":
            bits, group, act_bits = 16, 0, None
        else:
            bits = weights.get("bits")
            if bits != 4:
                raise FormatError(f"quantization_config.weights.bits is {bits!r}; only 4 is supported")
            if weights.get("symmetric") is not True:
                raise FormatError("quantization_config.weights.symmetric must be true")
            group = weights.get("group_size", 0)
            if not isinstance(group, int) or group < 0 or group % 8:
                raise FormatError(f"quantization_config.weights.group_size is {group!r}; expected 0 or a multiple of 8")
            act_bits = None
            if SCHEMES[scheme][1] is not None:
                if not isinstance(acts, dict):
                    raise FormatError(f"quantization_config.activations is required for scheme {scheme}")
                act_bits = acts.get("bits")
                if act_bits != SCHEMES[scheme][1]:
                    raise FormatError(
                        f"quantization_config.activations.bits is {act_bits!r}; scheme {scheme} needs {SCHEMES[scheme][1]}"
                    )
                for key, want in (("symmetric", True), ("dynamic", True), ("granularity", "per_token")):
                    if acts.get(key) != want:
                        raise FormatError(f"quantization_config.activations.{key} must be {want!r}")
                if "clip" in acts:
                    act_clip = acts["clip"]
                    if version == 1:
                        raise FormatError("quantization_config.activations.clip needs format_version 2 (version 1 has no clip)")
                    if isinstance(act_clip, bool) or not isinstance(act_clip, (int, float)) or not 0 < act_clip <= 1:
                        raise FormatError(f"quantization_config.activations.clip is {act_clip!r}; expected a number in (0, 1]")
                    act_clip = float(act_clip)
        online_raw = qc.get("online") or {}
        if not isinstance(online_raw, dict):
            raise FormatError("quantization_config.online must be an object of module name -> spec")
        online = {name: OnlineSpec.from_dict(d, name) for name, d in online_raw.items()}
        return cls(scheme, bits, group, act_bits, online, qc, act_clip)

    @property
    def quantized(self) -> bool:
        return self.scheme != "none"


def make_quant_config(
    scheme: str,
    group_size: int,
    online: dict,
    r1: dict,
    r2: dict | None,
    clip: str,
    act_clip: float = 1.0,
) -> dict:
    """Build the `quantization_config` written to config.json (version 1 unless activations are clipped)."""
    act_bits = SCHEMES[scheme][1]
    clipped = act_bits is not None and act_clip != 1.0
    acts = None if act_bits is None else {"bits": act_bits, "symmetric": True, "dynamic": True, "granularity": "per_token"}
    if clipped:
        acts["clip"] = float(act_clip)
    qc = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION if clipped else 1,
        "scheme": scheme,
        "weights": None
        if scheme == "none"
        else {"bits": 4, "symmetric": True, "group_size": group_size, "packing": "int32-offset8", "clip": clip},
        "activations": acts,
        "r1": r1,
        "r2": r2,
        "online": {name: spec.to_dict() for name, spec in sorted(online.items(), key=lambda kv: _natural(kv[0]))},
        "ignore": ["lm_head"],
    }
    return qc


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]
