"""Setup pass learn (--learn-rotation): R1 learned by Cayley SGD on the Stiefel manifold, SpinQuant-style.

R1 starts as the converter's own (the Hadamard of rotate.setup_r1, random signs with --seed)
and is optimised as an orthogonal matrix to minimise the model's next-token cross-entropy on
calibration windows, with the scheme's int4 weight and activation quantization in the loop
(fake quantization, straight-through rounding; round-to-nearest weights per channel or group at
the clip ratios the conversion's --clip rule picks for the currently rotated weights, refreshed
every CLIP_EVERY steps; per-token activations). Everything else in the loop is what the converter writes: folded
norms, the per-head R2, and the online Hadamards with their expansion, all fixed. The
learned R1 then replaces the Hadamard for every later pass (GPTQ, budget, Fisher, the fusion
into the weights), so the checkpoint format is unchanged; it is also written to
DST/rotation/r1.safetensors, which ``--rotation FILE`` reads back (convert again with other
options without learning again).

The step (Li et al. 2020, as SpinQuant uses it): with momentum M ← βM + G (G = ∂L/∂R1),
the skew matrix A = M R1ᵀ − R1 Mᵀ and a step α = min(lr_t, 1/‖A‖₁) (lr_t: cosine schedule),

    R1 ← (I + α/2 A)⁻¹ (I − α/2 A) R1,

which is orthogonal exactly (a Cayley transform), computed in float64.

Unlike the other passes this one holds the whole model at once (float32, with autograd):
``memory_estimate`` says how much, and the pass refuses before loading when the machine's
available memory is smaller.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..format import SCHEMES, linear_names
from ..quant import WEIGHT_QMAX, WEIGHT_QMIN, online_rotate, qmax
from . import calibrate, rotate
from .clip import choose_scale
from .state import ConvertError, ModelState

MOMENTUM = 0.9
LEARN_WEIGHTS = ("rtn", "float")  # weights in the loop: fake-quantized as the conversion's RTN, or float (W16A4)
CLIP_EVERY = 10  # steps between refreshes of the clip ratios (the --clip search on the rotated weights)
ROTATION_FILE = "rotation/r1.safetensors"  # inside DST; the glob of *.safetensors weights never sees it
_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # W <- W @ R1 (writers: R1ᵀ @ W)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_weight(w: torch.Tensor, group_size: int, ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
    """RTN int4 of `w` [out, in] per channel (0) or group at scale ratio · absmax / 7 (`ratio` [out, groups]:
    the clip rule's), straight-through rounding."""
    out, k = w.shape
    wg = w.reshape(out, k // (group_size or k), group_size or k)
    ratio = ratio.unsqueeze(-1) if isinstance(ratio, torch.Tensor) else ratio
    scale = (wg.abs().amax(-1, keepdim=True) * ratio / WEIGHT_QMAX).clamp_min(1e-12)
    return (torch.clamp(_ste_round(wg / scale), WEIGHT_QMIN, WEIGHT_QMAX) * scale).reshape(out, k)


def fake_quant_activation(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Per-token symmetric `bits` quantization of x (as quant.quantize_activation, with its --act-clip ratio),
    straight-through rounding."""
    qm = qmax(bits)
    scale = (x.abs().amax(-1, keepdim=True) * clip / qm).clamp_min(1e-12)
    return torch.clamp(_ste_round(x / scale), -qm - 1, qm) * scale


class _Rotation:
    """The one R1 (float32, autograd leaf) every loop linear reads in a step."""

    r: torch.Tensor | None = None


class LoopLinear(torch.nn.Module):
    """A decoder linear in the learning loop: R1 applied to its weight (reader: W R1, writer: R1ᵀ W and
    b R1), the fixed online rotation of its input, then fake int4 weight and activation quantization."""

    def __init__(self, weight, bias, reader: bool, spec, act_bits, group_size, rot: _Rotation, quant_weights=True,
                 act_clip: float = 1.0):
        super().__init__()
        self.weight, self.bias, self.reader, self.spec = weight, bias, reader, spec
        self.quant_weights, self.act_clip = quant_weights, act_clip
        self.act_bits, self.group_size, self.rot = act_bits, group_size, rot
        self.ratio: torch.Tensor | float = 1.0  # clip ratio per channel/group (LoopModel.refresh_clip)

    def rotated(self, r: torch.Tensor) -> torch.Tensor:
        return self.weight @ r if self.reader else r.t() @ self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rot.r
        w = self.rotated(r)
        b = self.bias if self.bias is None or self.reader else self.bias @ r
        if self.spec is not None:
            x = online_rotate(x, self.spec.size, self.spec.k, blocks=self.spec.blocks)
        if self.act_bits is not None:
            x = fake_quant_activation(x, self.act_bits, self.act_clip)
        if self.quant_weights:
            w = fake_quant_weight(w, self.group_size, self.ratio)
        y = x @ w.t()
        return y if b is None else y + b


class LoopModel:
    """The whole model in float32 with R1 as an input: loss(r1, ids) = mean next-token cross-entropy.
    `checkpoint`: keep only each decoder layer's input for the backward pass and run the layer again there
    (activation checkpointing: about one more forward pass, a fraction of the memory)."""

    def __init__(self, state: ModelState, checkpoint: bool = False):
        self.rot, self.checkpoint = _Rotation(), checkpoint
        act_bits = SCHEMES[state.options.scheme][1]
        self.embed = rotate.rotated_part(state, "embed", r1=False).tensors["model.embed_tokens.weight"].float()
        self.head = rotate.rotated_part(state, "head", r1=False).tensors["lm_head.weight"].float()  # final norm gain folded in
        self.eps = float(state.config.get("rms_norm_eps", 1e-6))
        self.layers, self.linears, self.clip = [], [], state.options.clip
        for i in range(state.num_layers):
            layer, self.rotary = calibrate._layer_module(state)
            t = rotate.rotated_part(state, f"layer.{i}", r1=False).tensors
            pre = f"model.layers.{i}."
            for name in linear_names(i):
                b = t.get(f"{name}.bias")
                lin = LoopLinear(t[f"{name}.weight"].float(), None if b is None else b.float(),
                                 name.rsplit(".", 1)[1] in _READERS, state.online.get(name), act_bits,
                                 state.group_size, self.rot, state.options.learn_weights == "rtn", state.act_clip)
                parent, attr = name[len(pre):].rsplit(".", 1)
                setattr(layer.get_submodule(parent), attr, lin)
                self.linears.append(lin)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, norm).weight.data = t[f"{pre}{norm}.weight"].float()  # ones: folded
            for p in layer.parameters():
                p.requires_grad_(False)
            self.layers.append(layer)

    def refresh_clip(self, r1: torch.Tensor) -> None:
        """Each linear's clip ratios: the conversion's --clip rule on its weight rotated by `r1` (no gradient)."""
        with torch.no_grad():
            for lin in self.linears:
                w = lin.rotated(r1.float())
                absmax = w.reshape(w.shape[0], -1, lin.group_size or w.shape[1]).abs().amax(-1)
                lin.ratio = choose_scale(w, lin.group_size, self.clip) * WEIGHT_QMAX / absmax.clamp_min(1e-12)

    def _layer(self, layer, h: torch.Tensor, r1: torch.Tensor, pos, pe) -> torch.Tensor:
        self.rot.r = r1  # set here, not once per step: a checkpointed layer runs again in the backward pass
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    def loss(self, r1: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed[ids] @ r1
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        pe = self.rotary(h, pos)
        for layer in self.layers:
            if self.checkpoint:
                h = torch.utils.checkpoint.checkpoint(self._layer, layer, h, r1, pos, pe, use_reentrant=False)
            else:
                h = self._layer(layer, h, r1, pos, pe)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # the final norm (gain in the head)
        logits = (h[:, :-1] @ r1.t()) @ self.head.t()  # the head stays float: rotate back instead of W R1
        self.rot.r = None
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def cayley_step(x: torch.Tensor, grad: torch.Tensor, mom: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One momentum Cayley SGD step of the orthogonal `x` (float64); returns (x, momentum)."""
    mom = MOMENTUM * mom + grad
    a = mom @ x.t() - x @ mom.t()
    alpha = min(lr, 1.0 / (torch.linalg.matrix_norm(a, ord=1).item() + 1e-8))
    eye = torch.eye(x.shape[0], dtype=x.dtype)
    x = torch.linalg.solve(eye + 0.5 * alpha * a, (eye - 0.5 * alpha * a) @ x)
    return x, mom


def memory_estimate(state: ModelState, checkpoint: bool = False) -> int:
    """Bytes the learning loop needs (float32): the weights and the rotated and quantized copies autograd keeps
    (~6 per linear weight), one step's activations (per token and layer ~32·hidden + 16·intermediate +
    4·heads·window floats, plus 4 vocab-sized rows for the logits), and 20% for the allocator. Fitted to
    SmolLM2-135M (docs/accuracy.md: 6.6–8.2 GiB peak at 1 × 512 tokens, killed at 14.3 GiB at 3 × 512).
    With `checkpoint` only one layer at a time holds its copies and activations; the others keep their input."""
    c, o = state.config, state.options
    h, inter, hd = state.hidden, int(c["intermediate_size"]), state.head_dim
    nh, nkv = int(c["num_attention_heads"]), int(c.get("num_key_value_heads") or c["num_attention_heads"])
    width = max([inter, *(s.size for s in state.online.values())])
    per_layer = h * hd * (nh + 2 * nkv) + nh * hd * h + 3 * h * width
    vocab, n = int(c["vocab_size"]), state.num_layers
    layer_acts = 32 * h + 16 * width + 4 * nh * o.calib_len  # floats per token
    if checkpoint:
        weights = (n + 6) * per_layer + 2 * vocab * h
        acts = o.learn_batch * o.calib_len * (n * h + layer_acts + 4 * vocab)
    else:
        weights = 6 * n * per_layer + 2 * vocab * h
        acts = o.learn_batch * o.calib_len * (n * layer_acts + 4 * vocab)
    return int(1.2 * 4 * (weights + acts))


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _windows(state: ModelState, n: int) -> tuple[torch.Tensor, int]:
    """`n` windows of --calib-len tokens from the calibration text, in order (cycling when it runs
    out); also how many distinct windows the text holds."""
    from transformers import AutoTokenizer

    o = state.options
    ids = AutoTokenizer.from_pretrained(state.src)(o.calib.read_text(encoding="utf-8"))["input_ids"]
    have = len(ids) // o.calib_len
    if have == 0:
        raise ConvertError(f"{o.calib}: {len(ids)} tokens, fewer than one --calib-len window of {o.calib_len}")
    w = torch.tensor(ids[: have * o.calib_len]).reshape(have, o.calib_len)
    return w[torch.arange(n) % have], have


def load_rotation(state: ModelState) -> None:
    """--rotation FILE: R1 from a file written by --learn-rotation (tensor 'r1', [hidden, hidden])."""
    path, n = state.options.rotation, state.hidden
    try:
        with safe_open(path, framework="pt") as f:
            r1 = f.get_tensor("r1").double()
    except Exception as e:  # missing file, not safetensors, no 'r1'
        raise ConvertError(f"--rotation {path}: not a rotation file written by --learn-rotation ({e})") from None
    if r1.shape != (n, n):
        raise ConvertError(f"--rotation {path}: R1 is {tuple(r1.shape)}, the model's hidden size is {n}")
    err = (r1.t() @ r1 - torch.eye(n, dtype=r1.dtype)).abs().max().item()
    if err > 1e-6:
        raise ConvertError(f"--rotation {path}: R1 is not orthogonal (max |R1ᵀR1 − I| = {err:.2e})")
    state.r1_signs = None
    state.r1_matrix = r1
    state.r1 = {"kind": "learned", "size": n, "file": str(path)}


def setup(state: ModelState) -> None:
    o = state.options
    if o.rotation is not None:
        if o.learn_rotation:
            raise ConvertError("--learn-rotation and --rotation FILE exclude each other")
        if not o.r1:
            raise ConvertError("--rotation FILE and --no-r1 exclude each other")
        load_rotation(state)
        return
    if not o.learn_rotation:
        return
    if o.scheme == "none":
        raise ConvertError("--learn-rotation learns against the quantization error and --no-quant has none; "
                           "to write a learned R1 unquantized, pass --rotation DST/rotation/r1.safetensors")
    if not o.r1 or state.r1 is None:
        raise ConvertError("--learn-rotation and --no-r1 exclude each other")
    if o.calib is None or not o.calib.is_file():
        raise ConvertError(f"--learn-rotation needs a calibration text file (--calib, or the built-in text); got {o.calib}")
    if o.learn_weights not in LEARN_WEIGHTS:
        raise ConvertError(f"--learn-weights {o.learn_weights!r}: choose one of {', '.join(LEARN_WEIGHTS)}")
    if o.learn_steps < 1 or o.learn_batch < 1 or not o.learn_lr > 0:
        raise ConvertError("--learn-steps and --learn-batch must be at least 1 and --learn-lr positive")
    have, plain = _available_memory(), memory_estimate(state)
    checkpoint = have is not None and plain > have
    need = memory_estimate(state, checkpoint)
    if have is not None and need > have:
        raise ConvertError(
            f"--learn-rotation needs about {need / 2**30:.1f} GiB (the whole model in float32 with autograd and "
            f"activation checkpointing, {o.learn_batch} × {o.calib_len} tokens a step) and {have / 2**30:.1f} GiB "
            "is available; lower --learn-batch or --calib-len, or use a larger machine")
    t0 = time.perf_counter()
    windows, distinct = _windows(state, o.learn_steps * o.learn_batch)
    model = LoopModel(state, checkpoint)
    if checkpoint:
        state.report["notes"].append(f"--learn-rotation: activation checkpointing (the plain loop needs about "
                                     f"{plain / 2**30:.1f} GiB, {have / 2**30:.1f} GiB is available)")
    x = rotate._times_r1(state, torch.eye(state.hidden, dtype=torch.float64))  # the converter's own R1
    mom = torch.zeros_like(x)
    losses = []
    bar = tqdm(range(o.learn_steps), desc="learn R1", unit="step", disable=not o.progress)
    for step in bar:
        if step % CLIP_EVERY == 0 and o.learn_weights == "rtn":
            model.refresh_clip(x)
        lr = 0.5 * o.learn_lr * (1 + math.cos(math.pi * step / o.learn_steps))
        r = x.float().requires_grad_(True)
        loss = model.loss(r, windows[step * o.learn_batch : (step + 1) * o.learn_batch])
        loss.backward()
        x, mom = cayley_step(x, r.grad.double(), mom, lr)
        losses.append(round(loss.item(), 6))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    init = state.r1
    state.r1_signs, state.r1_matrix = None, x
    state.r1 = {"kind": "learned", "size": state.hidden, "init": init}
    state.report["learn_rotation"] = {
        "method": "Cayley SGD on the Stiefel manifold (momentum 0.9, cosine lr), fake quantization in the loop "
                  "(straight-through rounding): per-token activations, "
                  + (f"RTN int4 weights at the --clip {o.clip} ratios, refreshed every {CLIP_EVERY} steps"
                     if o.learn_weights == "rtn" else "float weights"),
        "weights_in_loop": o.learn_weights,
        "init": init, "steps": o.learn_steps, "lr": o.learn_lr, "windows_per_step": o.learn_batch,
        "tokens_per_window": o.calib_len, "distinct_windows": min(distinct, len(windows)),
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        "orthogonality_error": (x.t() @ x - torch.eye(state.hidden, dtype=x.dtype)).abs().max().item(),
        "activation_checkpointing": checkpoint, "memory_estimate_bytes": need, "seconds": round(time.perf_counter() - t0, 3),
    }


def save(state: ModelState, tmp: Path) -> None:
    """Write a learned R1 to tmp/rotation/r1.safetensors (read back by --rotation FILE)."""
    if state.r1 is None or state.r1.get("kind") != "learned":
        return
    (tmp / ROTATION_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file({"r1": state.r1_matrix.contiguous()}, str(tmp / ROTATION_FILE), metadata={"format": "pt"})
