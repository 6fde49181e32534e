"""Setup pass expand_budget (--expand-budget F, with --calib FILE): selective, progressive
expansion. Instead of a fixed --expand, choose which online layers to expand and by how
many size-rule steps, spending at most F × (linear parameters) extra parameters.

Criterion (measured, weight-only): the output error of a layer whose input x (N wide) is
padded and rotated, x' = T x with T = A_M P (zero-pad N -> M, Hadamard A_M; per block with
--tp-blocks), and whose expanded weight W_M = W Pᵀ A_Mᵀ is round-to-nearest int4 quantized
(the --clip rule and group size of the conversion) is

    err(M) = E‖(W_M − Q(W_M)) x'‖² = tr(Ẽ H Ẽᵀ),   Ẽ = (W_M − Q(W_M)) A_M P,   H = 2XᵀX/n,

so one N×N Hessian of the layer's original input scores every candidate size M: Ẽ is the
quantization error rotated back (the inverse fast transform) and cut to the N real inputs.
Candidates per layer are M_s = blocks · next_size(N/blocks, s, multiple=8) for s = 0 (rotation
only) .. MAX_STEPS, as long as they fit the budget (and the group size divides the block).
Greedy: repeatedly take the move (layer, s -> s') with the largest error reduction per
added parameter, (err(M_s) − err(M_s')) / (out · (M_s' − M_s)), among the moves that still
fit the remaining budget and reduce the error; s' may be several steps ahead, so one noisy
step does not hide a good larger size (with errors falling convexly this is the plain
+1-step greedy). Stops when no move fits or helps, so the overhead never exceeds F.

Two phases: the choice needs every layer's score before the first layer is written, so this
setup pass streams the model once more before the conversion proper: read -> fuse_norms ->
r1 -> r2 -> online (unexpanded) for each decoder layer, runs the float layer on the
calibration hidden states (float propagation: the scores come from the unquantized
model, known before any layer is quantized), forms H for each online layer, scores its
candidates and drops H. Cost: one extra read and float forward of every layer on
--calib-samples × --calib-len tokens (as --gptq's collect), plus, per online layer and
candidate, one RTN quantization of an out × M matrix and one out × N × N product; peak
memory is one layer in float64, the calibration activations and one N×N Hessian.
Not modelled: activation quantization (W4A4/W4A8 also gain from expansion), GPTQ and
saliency weighting (the score is RTN with the plain clip rule). With --no-quant the
choice is made as for per-channel int4 and the float model is written.

Measured once (SmolLM2-135M, W4A4, F = 0.0164 = the overhead of one uniform step, 8×512
calibration tokens, NLL on 1024 held-out tokens): the budget went to 7 of 30 down_proj
(layers 11 and 23-29, up to 2560 wide), each layer's scored error fell 10-40 %, and NLL was
4.86 against 4.93 unexpanded but 4.65 for one uniform step; other allocations at the same
size (by relative error, or with int4 activations in the error) scored 4.85-5.14, so at this
scale the end-to-end effect of an allocation is noisier than the criterion. The choice is
not shown to beat uniform expansion. The pass took 1583 s there (2 loaded cores; the
conversion itself 177-247 s), 80 % of it the clip search of the 9 candidates per layer.

End-to-end check (``check_end_to_end``): the weight-only criterion always finds some reduction, but
at W4A4 an expansion can still make the model worse (docs/accuracy.md: one step of down_proj
expansion moved SmolLM2's perplexity by less than the R1-seed spread, and up or down). So before
the choice is kept, the model is streamed twice more (heldout.quantized_loss): unexpanded and with the
chosen sizes, each with round-to-nearest int4 weights (the --clip rule) and the scheme's activation
quantization (--act-clip included), and its mean next-token loss is measured on heldout.WINDOWS
held-out windows of --calib (the ones after the calibration windows). The expansion is kept only if
its loss is lower; otherwise the conversion runs unexpanded and the report says why (with
--no-quant there is nothing to measure and no check). Cost: per decoder layer two more reads and
clip searches of its weights, and two forwards on the held-out tokens.

The result is in report["expand_budget"]: the chosen layer -> size with the measured
errors before / after, the greedy moves with their reduction per parameter, and the full
candidate table, and "check" (both losses and whether the expansion was kept); its run time
(check included) is report["timing"]["setup_s"]["expand_budget"].
"""
from __future__ import annotations

import math

import torch

from ..format import OnlineSpec, linear_names
from ..hadamard import factor, hadamard_k, hadamard_transform, next_size
from ..quant import online_rotate
from . import calibrate, fuse_norms, heldout, load, online, rotate, write
from .clip import rtn_weight
from .gptq import hessian
from .state import ConvertError, ModelState

MAX_STEPS = 8  # size-rule steps considered per layer (8192 -> 12288 for Llama-3.2-1B's down_proj)


def candidates(spec: OnlineSpec, out_features: int, budget_params: int, group_size: int) -> list[dict]:
    """Candidate sizes of one online layer: steps 0 (no expansion) .. MAX_STEPS that fit the budget."""
    b, n = spec.blocks, spec.block_in
    cands = [{"steps": 0, "size": spec.in_features, "k": spec.k, "added_params": 0}]
    for s in range(1, MAX_STEPS + 1):
        m = next_size(n, s, multiple=8)
        added = out_features * (m * b - spec.in_features)
        if added > budget_params:
            break
        if group_size and m % group_size:
            continue  # the quantizer's groups must tile every block
        cands.append({"steps": s, "size": m * b, "k": factor(m)[0], "added_params": added})
    return cands


def rtn_output_error(w: torch.Tensor, h: torch.Tensor, size: int, k: int, blocks: int,
                     group_size: int, clip: str) -> float:
    """tr(Ẽ H Ẽᵀ): output error of RTN int4 on the padded+rotated weight, from the input Hessian H [N, N]."""
    n = w.shape[1]
    wm = online_rotate(w.double(), size, k, blocks=blocks).float()
    e = rtn_weight(wm, group_size, clip) - wm  # [out, M]
    # back-rotate: E @ A per block (A = (H_K ⊗ H_P)/√m, so E @ A = T with H_K transposed), keep N/blocks
    eb = e.double().reshape(e.shape[0], blocks, size // blocks)
    eb = hadamard_transform(eb, k, hadamard_k(k).t().contiguous().double())
    et = eb[..., : n // blocks].reshape(e.shape[0], n).float()
    return float(((et @ h.float()) * et).sum(dtype=torch.float64))


def check_options(o) -> None:
    """Refuse a bad --expand-budget combination (run by ``pipeline.convert`` before any pass, so before
    the calibration pass of the default GPTQ recipe reads --calib)."""
    if o.expand_budget is None:
        return
    f = o.expand_budget
    if o.expand:
        raise ConvertError("--expand-budget and --expand exclude each other: the budget chooses the expanded "
                           "layers and sizes itself (drop --expand, or drop --expand-budget to set sizes by hand)")
    if not (isinstance(f, (int, float)) and math.isfinite(f) and f >= 0):
        raise ConvertError(f"--expand-budget {f}: must be a fraction >= 0 of the linear parameters (e.g. 0.05)")
    if o.calib is None or not o.calib.is_file():
        raise ConvertError(f"--expand-budget needs a calibration text file (--calib); got {o.calib}")


def plan(state: ModelState) -> None:
    o = state.options
    if o.expand_budget is None:
        return
    check_options(o)
    f = o.expand_budget
    if not state.online:
        raise ConvertError("--expand-budget: no layer has an online rotation (--online is empty)")
    before, _ = write.param_counts(state)
    budget_params = math.floor(f * before)
    while budget_params > 0 and budget_params / before > f:  # float rounding: never above F
        budget_params -= 1
    hidden = state.hidden  # out_features of down_proj and o_proj
    table = {name: candidates(spec, hidden, budget_params, state.group_size) for name, spec in state.online.items()}
    table = {name: c for name, c in table.items() if len(c) > 1}
    result = {
        "budget": f, "linear_params": before, "budget_params": budget_params,
        "criterion": (f"tr(E H E^T): output error of round-to-nearest int4 weights (clip {o.clip}, group size "
                      f"{state.group_size}) on the padded+rotated calibration inputs of the float model; "
                      "greedy by error reduction per added parameter"),
        "max_steps": MAX_STEPS, "chosen": {}, "moves": [], "candidates": {},
    }
    if table:
        _score(state, table)
        result["calib_tokens"] = o.calib_samples * o.calib_len
        used, moves, current = _greedy(table, budget_params)
        unexpanded = dict(state.online)
        for name, i in current.items():
            base, c = table[name][0], table[name][i]
            spec = state.online[name]
            state.online[name] = OnlineSpec(spec.in_features, c["size"], c["k"], spec.blocks)
            result["chosen"][name] = {
                "in_features": spec.in_features, "size": c["size"], "steps": c["steps"],
                "added_params": c["added_params"], "error_unexpanded": base["error"], "error": c["error"],
                "reduction": base["error"] - c["error"],
                "relative_reduction": (base["error"] - c["error"]) / base["error"] if base["error"] > 0 else 0.0,
            }
        result["moves"] = moves
        result["candidates"] = {
            name: [{k: c[k] for k in ("steps", "size", "added_params", "error")} for c in cands]
            for name, cands in table.items()
        }
        if result["chosen"] and o.scheme != "none":
            result["check"] = check = check_end_to_end(state, {"unexpanded": unexpanded, "chosen": dict(state.online)})
            if not check["kept"]:  # expansion does not pay here: convert without it
                state.online = unexpanded
                result["chosen"], used = {}, 0
                result["note"] = (f"the chosen expansion did not lower the held-out loss of the round-to-nearest "
                                  f"{o.scheme} model ({check['nll']['chosen']:.4f} vs {check['nll']['unexpanded']:.4f} "
                                  "nats/token unexpanded): nothing expanded")
                state.report["notes"].append(f"--expand-budget: {result['note']}")
    else:
        used = 0
        result["note"] = "no expansion step fits the budget; nothing expanded (no calibration pass run)"
    result["added_params"] = used
    result["param_overhead"] = used / before
    state.report["expand_budget"] = result


def _score(state: ModelState, table: dict) -> None:
    """The extra streaming pass: float forward on the calibration tokens, one Hessian per scored layer."""
    ids = state.calib_ids if state.calib_ids is not None else calibrate.tokens(state, "--expand-budget")
    saved_x = state.calib_x
    try:
        for pname in state.part_names()[:-1]:  # embed + decoder layers; the head is not needed
            part = load.read_part(state, pname)
            fuse_norms.apply(state, part)
            rotate.apply_r1(state, part)
            rotate.apply_r2(state, part)
            if part.layer is None:
                state.calib_x = part.tensors["model.embed_tokens.weight"][ids].float()
                continue
            mine = [n for n in linear_names(part.layer) if n in table]
            raw = {n: part.tensors[f"{n}.weight"].clone() for n in mine}  # before the online rotation
            online.apply_online(state, part)
            weights = {n: part.tensors[f"{n}.weight"].float() for n in linear_names(part.layer)}
            captured: dict = {}
            x = calibrate._run(state, part, weights, captured).float()
            for name in mine:
                h = hessian(torch.cat([a.reshape(-1, a.shape[-1]) for a in captured[name]]))
                spec = state.online[name]
                for c in table[name]:
                    c["error"] = rtn_output_error(raw[name], h, c["size"], c["k"], spec.blocks,
                                                  state.group_size, state.options.clip)
            state.calib_x = x
    finally:
        state.calib_x = saved_x


def check_end_to_end(state: ModelState, plans: dict) -> dict:
    """Keep the greedy's expansion only if the model it gives is better end to end: heldout.quantized_loss (the
    round-to-nearest model's loss on held-out calibration windows) under each plan of online specs
    ({key: {layer: OnlineSpec}}, keys "unexpanded" and "chosen")."""
    ids = heldout.heldout_tokens(state, "--expand-budget's held-out check")
    saved = state.online
    nll = {}
    try:
        for key, specs in plans.items():
            state.online = specs
            nll[key] = heldout.quantized_loss(state, ids)
    finally:
        state.online = saved
    return {"windows": heldout.WINDOWS, "tokens": int(ids.numel()), "nll": nll, "kept": nll["chosen"] < nll["unexpanded"],
            "criterion": "mean next-token loss of the round-to-nearest model on held-out calibration windows; "
                         "the expansion is kept only if it is lower than unexpanded"}


def _greedy(table: dict, budget_params: int) -> tuple[int, list, dict]:
    current = {name: 0 for name in table}
    used, moves = 0, []
    while True:
        best = None
        for name in sorted(table):
            cands, i = table[name], current[name]
            for j in range(i + 1, len(cands)):
                extra = cands[j]["added_params"] - cands[i]["added_params"]
                if used + extra > budget_params:
                    break
                gain = cands[i]["error"] - cands[j]["error"]
                if gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, name, j, extra, gain)
        if best is None:
            break
        ratio, name, j, extra, gain = best
        i = current[name]
        moves.append({"layer": name, "from_size": table[name][i]["size"], "to_size": table[name][j]["size"],
                      "added_params": extra, "error_reduction": gain, "reduction_per_param": ratio})
        current[name] = j
        used += extra
    return used, moves, {name: i for name, i in current.items() if i > 0}
