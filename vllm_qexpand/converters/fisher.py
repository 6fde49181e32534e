"""Setup pass fisher (--saliency fisher, with --calib FILE): the per-weight Fisher diagonal of
the float model's loss, on the weights actually quantized, for the clip search.

    F[o, j] = (1/n) Σ_w (∂L_w / ∂W'[o, j])²

over the n calibration windows w, L_w = mean next-token cross-entropy of window w, and W'
the rotated, expanded weight (after norm folding, R1, R2 and the online rotation with
expansion): the sequence-level empirical Fisher that SqueezeLLM's gradient tool computes
and Cao & Aref's saliency regularizer uses (seed-methods.md (b)), here of the model this
converter writes (in float), not of the source model. The clip search (clip.py, ``mse``)
then minimises Σ_j F[o, j] (Q(w)[o, j] − w[o, j])² per channel (or group); F is scaled
to mean 1 per linear (the search is scale-free).

This needs backward passes through the whole model, and the converter streams one layer
at a time, so the pass streams the model twice before the conversion proper:

1. forward sweep: read -> fuse_norms -> r1 -> r2 -> online, run the float decoder layer on
   the hidden states of the calibration windows, save each layer's input hidden states
   to a temporary directory (disk, float32: n × len × hidden per layer);
2. the head (final norm folded into lm_head): ∂L/∂h at the last hidden state;
3. backward sweep, last layer first: read and rotate the layer again, re-run it on its
   saved input with autograd (windows in chunks of CHUNK), back-propagate ∂L/∂h, and
   form for each linear the per-window gradient ∂L_w/∂W' = G_wᵀ X_w (G_w: gradient at
   the linear's output, X_w: its actual input, after the online rotation) and square it;
   F is saved per layer and read back by quantize (then deleted).

Peak memory: one layer, the hidden states and their gradient for all windows (as the
Hessian calibration), and one chunk's activations with autograd. Cost: about four float
forward passes of the model (one sweep forward, one forward + backward) plus the
lm_head logits (forward and backward) on --calib-samples × --calib-len tokens, and disk
for num_layers × calib tokens × hidden float32. Not the Fisher of the quantized model,
and not the K-FAC factorisation E[g²]·E[x²] (which would leave the per-channel clip
choice identical to --saliency act).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..format import linear_names
from ..quant import online_rotate
from . import calibrate, rotate
from .state import ConvertError, ModelState, Part

CHUNK = 4  # windows per autograd chunk through a decoder layer (bounds activation memory)
TOKENS = 256  # positions per lm_head logits slice (bounds the vocab-sized logits)


class _Linear(torch.nn.Module):
    """A float linear on the rotated, expanded weight that keeps its input and output for the Fisher."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec):
        super().__init__()
        self.weight, self.bias, self.spec = weight, bias, spec
        self.x = self.y = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is not None:
            x = online_rotate(x, self.spec.size, self.spec.k, blocks=self.spec.blocks)
        y = x @ self.weight.t()
        if self.bias is not None:
            y = y + self.bias
        if y.requires_grad:
            y.retain_grad()
            self.x, self.y = x.detach(), y
        return y


def _layer(state: ModelState, part: Part) -> tuple:
    """The float decoder layer of `part` with _Linear modules: (layer, rotary, {name: _Linear})."""
    if state.calib_layer is None:
        state.calib_layer = calibrate._layer_module(state)
    layer, rotary = state.calib_layer
    pre = f"model.layers.{part.layer}."
    t = part.tensors
    mods = {}
    for name in linear_names(part.layer):
        b = t.get(f"{name}.bias")
        mods[name] = _Linear(t[f"{name}.weight"].float(), None if b is None else b.float(), state.online.get(name))
        parent, attr = name[len(pre):].rsplit(".", 1)
        setattr(layer.get_submodule(parent), attr, mods[name])
    for norm in ("input_layernorm", "post_attention_layernorm"):
        getattr(layer, norm).weight.data = t[f"{pre}{norm}.weight"].float()
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer, rotary, mods


def _forward(layer, rotary, x: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rotary(x, pos))
    return out[0] if isinstance(out, tuple) else out


def _head_grad(state: ModelState, h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """dL/dh at the last hidden state, L = Σ_w mean_t CE; logits TOKENS positions at a time (bounded memory)."""
    head = rotate.rotated_part(state, "head").tensors
    lm_head = head["lm_head.weight"].float()
    gain = head["model.norm.weight"].float()
    eps = float(state.config.get("rms_norm_eps", 1e-6))
    grad = torch.zeros_like(h)
    loss_sum = 0.0
    n, t = ids.shape
    for w in range(n):
        for a in range(0, t - 1, TOKENS):
            x = h[w, a : min(a + TOKENS, t - 1)].clone().requires_grad_(True)
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
            loss = torch.nn.functional.cross_entropy(normed @ lm_head.t(), ids[w, a + 1 : a + 1 + x.shape[0]],
                                                     reduction="sum") / (t - 1)
            loss.backward()
            grad[w, a : a + x.shape[0]] = x.grad
            loss_sum += loss.item()
    return grad, loss_sum


def setup(state: ModelState) -> None:
    o = state.options
    if o.saliency != "fisher":
        return
    if o.scheme == "none":
        raise ConvertError("--saliency and --no-quant exclude each other")
    ids = state.calib_ids if state.calib_ids is not None else calibrate.tokens(state, "--saliency fisher")
    state.fisher_dir = tempfile.TemporaryDirectory(prefix="qexpand-fisher-")
    d = Path(state.fisher_dir.name)
    n = ids.shape[0]
    layers = range(state.num_layers)

    # 1. forward sweep, saving each layer's input
    h = rotate.rotated_part(state, "embed").tensors["model.embed_tokens.weight"][ids].float()
    for i in layers:
        save_file({"h": h.contiguous()}, str(d / f"h.{i}.safetensors"))
        layer, rotary, _ = _layer(state, rotate.rotated_part(state, f"layer.{i}"))
        with torch.no_grad():
            h = torch.cat([_forward(layer, rotary, h[c : c + CHUNK]) for c in range(0, n, CHUNK)])

    # 2. the head: dL/dh of L = sum over windows of the window's mean next-token cross-entropy
    grad, loss_sum = _head_grad(state, h, ids)
    del h

    # 3. backward sweep: per-window weight gradients, squared and averaged
    for i in reversed(layers):
        part = rotate.rotated_part(state, f"layer.{i}")
        layer, rotary, mods = _layer(state, part)
        hin = load_file(str(d / f"h.{i}.safetensors"))["h"]
        (d / f"h.{i}.safetensors").unlink()
        fisher = {name: torch.zeros_like(m.weight) for name, m in mods.items()}
        for c in range(0, n, CHUNK):
            x = hin[c : c + CHUNK].clone().requires_grad_(True)
            with torch.enable_grad():
                _forward(layer, rotary, x).backward(grad[c : c + CHUNK])
            grad[c : c + CHUNK] = x.grad
            for name, m in mods.items():
                g = m.y.grad
                for w in range(g.shape[0]):
                    fisher[name] += (g[w].t() @ m.x[w]).pow(2)
                m.x = m.y = None
        save_file({name: (f / f.mean().clamp_min(1e-30)).contiguous() for name, f in fisher.items()},
                  str(d / f"fisher.{i}.safetensors"))
    state.report["fisher"] = {
        "kind": "per-weight empirical Fisher E_window[(dL_w/dW')^2] of the float rotated/expanded model, "
                "L_w = mean next-token cross-entropy of a calibration window",
        "windows": n, "tokens_per_window": int(ids.shape[1]), "calib_loss": round(loss_sum / n, 6),
    }


def layer_importance(state: ModelState, layer: int) -> dict:
    """{linear name: Fisher [out, in]} of one decoder layer (its file is deleted once read)."""
    path = Path(state.fisher_dir.name) / f"fisher.{layer}.safetensors"
    f = load_file(str(path))
    path.unlink()
    return f
