"""The converter: named passes over one model state, streamed one part at a time.

setup (once):  load -> r1 -> r2 -> online -> expand -> quantize -> refine -> calibrate
               -> choose_r1 -> learn -> expand_budget -> fisher
per part:      read -> fuse_norms -> r1 -> r2 -> online -> [calib_embed, collect] -> quantize
               -> [propagate] -> write        ([...]: only with --gptq)
Parts are 'embed', each decoder layer, and 'head', so peak memory is about one
part in float64 plus the rotation matrices, whatever the model size.
expand_budget (only with --expand-budget) streams the layers once more before the
conversion proper, to score every online layer's candidate sizes (see budget.py).
fisher (only with --saliency fisher) streams the layers forward and then backward once
before the conversion proper, for the per-weight Fisher of the loss (see fisher.py).
choose_r1 (only with --r1-candidates K > 1) picks R1 among K sign draws by the held-out loss of
the round-to-nearest model (heldout.py: one more quantized stream of the model per draw).
learn (only with --learn-rotation, or --rotation FILE) replaces R1 by a learned one before any
weight is fused: it holds the whole model once (see learn.py), the only pass that does.
refine (--refine sde, setup: checks and the held-out split) works inside quantize
(see refine.py); collect then also forms the held-out windows' Hessians.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from tqdm import tqdm

from . import budget, calibrate, fisher, fuse_norms, learn, load, online, quantize, refine, rotate, write
from .state import ConvertError, ModelState, Options

SETUP_PASSES = (
    ("load", load.setup),
    ("r1", rotate.setup_r1),
    ("r2", rotate.setup_r2),
    ("online", online.plan_online),
    ("expand", online.plan_expand),
    ("quantize", quantize.setup),
    ("refine", refine.setup),
    ("calibrate", calibrate.setup),
    ("choose_r1", rotate.choose_r1),
    ("learn", learn.setup),
    ("expand_budget", budget.plan),
    ("fisher", fisher.setup),
)
PART_PASSES = (
    ("fuse_norms", fuse_norms.apply),
    ("r1", rotate.apply_r1),
    ("r2", rotate.apply_r2),
    ("online", online.apply_online),
    ("calib_embed", calibrate.embed),
    ("collect", calibrate.collect),
    ("quantize", quantize.apply),
    ("propagate", calibrate.propagate),
)


def convert(src: str | Path, dst: str | Path, options: Options | None = None) -> dict:
    """Convert the HF checkpoint at `src` into a qexpand checkpoint at `dst`; returns the report."""
    options = options or Options()
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src:
        raise ConvertError("DST must differ from SRC (the source is never modified)")
    if dst.exists() and not options.force:
        raise ConvertError(f"{dst} exists; pass --force to replace it")
    budget.check_options(options)
    state = ModelState(src=src, config=load.read_config(src), options=options)
    t0 = time.perf_counter()
    setup_timings = {}
    for sname, fn in SETUP_PASSES:
        t = time.perf_counter()
        fn(state)
        setup_timings[sname] = round(time.perf_counter() - t, 3)
    tmp = write.make_tmpdir(dst)
    index: dict = {}
    timings = {name: 0.0 for name, _ in PART_PASSES}
    try:
        for name in tqdm(state.part_names(), desc="convert", unit="part", disable=not options.progress):
            part = load.read_part(state, name)
            for pname, fn in PART_PASSES:
                t = time.perf_counter()
                fn(state, part)
                timings[pname] += time.perf_counter() - t
            write.apply(state, part, tmp, index)
        before, after = write.param_counts(state)
        report = {
            "source": str(src),
            "scheme": options.scheme,
            "recipe": recipe(options),
            "r1": state.r1,
            "r2": state.r2,
            "online": {k: v.to_dict() for k, v in state.online.items()},
            "linear_params": before,
            "linear_params_expanded": after,
            "param_overhead": round(after / before - 1, 6),
            "notes": state.report["notes"],
            "layers": state.report["layers"],
            **{k: v for k, v in state.report.items() if k not in ("notes", "layers")},  # e.g. expand_budget
            "timing": {"total_s": round(time.perf_counter() - t0, 3), "passes_s": {k: round(v, 3) for k, v in timings.items()},
                       "setup_s": setup_timings},
        }
        learn.save(state, tmp)
        write.finalize(state, tmp, dst, index, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def recipe(o: Options) -> str:
    """One line naming what the conversion did (printed by the CLI, stored in the report)."""
    text = "the built-in text" if o.calib_builtin and o.calib and o.calib.name == "calibration-books.txt" else str(o.calib)
    r1 = []
    if o.learn_rotation:
        r1 = [f"learned R1 ({o.learn_steps} Cayley SGD steps of {o.learn_batch}x{o.calib_len} tokens of {text})"]
    elif o.rotation is not None:
        r1 = [f"R1 from {o.rotation}"]
    if o.r1_candidates > 1:
        r1.insert(0, f"R1 the best of {o.r1_candidates} sign draws by held-out loss")
    if o.scheme == "none":
        return ", ".join(["no quantization (rotated, expanded float weights)", *r1])
    parts = [f"{o.scheme}", f"clip {o.clip}"]
    if quantize.act_clip_of(o) != 1.0:
        parts.append(f"activation clip {quantize.act_clip_of(o):g}")
    if o.gptq:
        parts.append(f"GPTQ ({'act-order, ' if o.act_order else ''}{o.damp:g} damping, "
                     f"{'sequential in-layer' if o.sequential else 'float-layer Hessians'})")
    else:
        data_free = (o.saliency == "none" and o.refine == "none" and o.expand_budget is None and not o.learn_rotation
                     and o.r1_candidates == 1)
        parts.append("round-to-nearest (data-free)" if data_free else "round-to-nearest")
    if o.saliency != "none":
        parts.append(f"saliency {o.saliency}")
    if o.refine != "none":
        parts.append(f"refine {o.refine}")
    parts += r1
    if o.calib is not None and (o.gptq or o.saliency != "none" or o.refine != "none" or o.expand_budget is not None
                                or o.r1_candidates > 1):
        parts.append(f"calibration {o.calib_samples}x{o.calib_len} tokens of {text}")
    return ", ".join(parts)


__all__ = ["convert", "ConvertError", "Options"]
