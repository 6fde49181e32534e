"""`qexpand` command line: convert and eval (thin: argument parsing only)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .converters.clip import CLIP_RULES
from .format import ONLINE_CHOICES, SCHEMES


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
                                   "write a qexpand checkpoint. SRC is never modified.")
    c.add_argument("src", type=Path, help="HF model directory (safetensors)")
    c.add_argument("dst", type=Path, help="output directory (must not exist unless --force)")
    c.add_argument("--scheme", choices=[s for s in SCHEMES if s != "none"], default="w4a4",
                   help="w4a4: int4 weights per channel + int4 per-token activations; w4a8: int8 activations; "
                        "w4a16: int4 weights per group, float activations (default: w4a4)")
    c.add_argument("--no-quant", action="store_true", help="write rotated+expanded float weights only (for checks)")
    c.add_argument("--group-size", type=int, default=None,
                   help="weight group size along the input; 0 = per output channel (default: 0, or 128 for w4a16)")
    c.add_argument("--clip", choices=CLIP_RULES, default="mse", help="weight clip rule (default: mse)")
    c.add_argument("--online", type=_online_arg, default=("down_proj",),
                   help="comma list of layers with an online Hadamard: down_proj, o_proj, or '' for none (default: down_proj)")
    c.add_argument("--expand", type=_expand_arg, action="append", default=[], metavar="PATTERN=N",
                   help="expand online layers whose name matches the regex PATTERN: N smaller than the layer's "
                        "width is a number of size-rule steps, otherwise the new size (repeatable; e.g. "
                        "down_proj=1, 'layers\\.[0-9]\\.mlp\\.down_proj=3', o_proj=2304)")
    c.add_argument("--gptq", action="store_true",
                   help="GPTQ with act-order on the rotated, expanded inputs (needs --calib)")
    c.add_argument("--saliency", choices=["none", "act"], default="none",
                   help="act: weight the clip search by E[x²] of each input, from --calib (default: none)")
    c.add_argument("--calib", type=Path, default=None, help="calibration text file for --gptq / --saliency")
    c.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    c.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    c.add_argument("--tp-blocks", type=int, default=1,
                   help="make online rotations block-diagonal in B blocks so the checkpoint serves at any "
                        "tensor-parallel size dividing B (default: 1)")
    c.add_argument("--no-r1", action="store_true", help="skip the residual rotation R1 (baselines only)")
    c.add_argument("--no-r2", action="store_true", help="skip the per-head rotation R2")
    c.add_argument("--seed", type=int, default=None, help="random ±1 signs on R1 from this seed (default: none)")
    c.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype of float tensors written (default: the source's)")
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="perplexity of an HF or qexpand directory in the torch reference",
                       description="Perplexity in plain PyTorch (the exact quantized math for qexpand dirs).")
    e.add_argument("model", type=Path, help="HF or qexpand model directory")
    e.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    e.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    e.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens (default: 8192; 0 = all)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    e.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        return _eval(args)
    except Exception as e:  # one clear line, non-zero exit
        from .converters.state import ConvertError
        from .format import FormatError

        if isinstance(e, (ConvertError, FormatError, FileNotFoundError, ValueError)):
            print(f"qexpand {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _convert(args) -> int:
    from .converters.pipeline import convert
    from .converters.state import Options

    opts = Options(
        scheme="none" if args.no_quant else args.scheme, group_size=args.group_size, clip=args.clip,
        online=args.online, expand=args.expand, seed=args.seed, dtype=args.dtype, r1=not args.no_r1, r2=not args.no_r2,
        force=args.force, progress=not args.quiet, tp_blocks=args.tp_blocks,
        gptq=args.gptq, saliency=args.saliency, calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len,
    )
    report = convert(args.src, args.dst, opts)
    print(f"wrote {args.dst}: scheme {report['scheme']}, {len(report['online'])} online rotations, "
          f"parameter overhead {100 * report['param_overhead']:.2f}%, {report['timing']['total_s']:.1f} s")
    return 0


def _eval(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .eval.perplexity import perplexity
    from .eval.reference import load_model

    if not args.text.is_file():
        raise FileNotFoundError(f"{args.text}: no such text file")
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(args.text.read_text(encoding="utf-8"))["input_ids"]
    model = load_model(args.model, getattr(torch, args.dtype))
    result = perplexity(model, ids, args.window, args.max_tokens or None)
    result.update(model=str(args.model), text=str(args.text), dtype=args.dtype)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
