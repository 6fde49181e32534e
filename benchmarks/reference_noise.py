"""How reproducible is a quantized model's perplexity under float-rounding-sized changes?

    python benchmarks/reference_noise.py DIR [--eps 1e-7] [--seeds 0,1,2] [--threads 1,2] [--convert-cmd CMD]
                                             [--out F.json]

Scores DIR (a qexpand checkpoint) in the torch reference, float32, on the accuracy protocol's
perplexity text (Pride and Prejudice, first --ppl-tokens tokens, windows of 512) several times:

- clean, once per torch thread count in --threads (GEMMs sum in a different order);
- with the input embeddings multiplied by (1 + eps·N(0, 1)), one run per seed in --seeds
  (eps = 1e-7 is about one float32 rounding step).

Each run's perplexity relative to the first clean run is the noise any second implementation
(e.g. vLLM's kernels vs PyTorch's) must be expected to show on the same checkpoint: with int4
activations a last-bit change can move a value across a rounding boundary, a whole quantization
step. served_vs_reference.py's difference is read against this spread (docs/accuracy.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def perturb_embeddings(model: torch.nn.Module, eps: float, seed: int) -> None:
    """Multiply the input embeddings by (1 + eps·N(0, 1)) in place, noise drawn from `seed`."""
    w = model.get_input_embeddings().weight
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        w.mul_(1 + eps * noise.to(w.dtype))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--eps", type=float, default=1e-7)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--convert-cmd", default=None, help="the conversion's command line, recorded in the result")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_qexpand.eval.data import evaluation_text
    from vllm_qexpand.eval.perplexity import perplexity
    from vllm_qexpand.eval.reference import load_model

    ids = AutoTokenizer.from_pretrained(args.model)(evaluation_text())["input_ids"]
    runs = []
    plan = [("clean", int(t), None) for t in args.threads.split(",") if t]
    plan += [("perturbed", int(args.threads.split(",")[-1]), int(s)) for s in args.seeds.split(",") if s]
    for kind, threads, seed in plan:
        torch.set_num_threads(threads)
        model = load_model(args.model, torch.float32)
        if seed is not None:
            perturb_embeddings(model, args.eps, seed)
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, 512, args.ppl_tokens, progress=False)["ppl"]
        runs.append({"kind": kind, "threads": threads, "seed": seed, "eps": args.eps if seed is not None else 0.0,
                     "ppl": ppl, "s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(runs[-1]), flush=True)
    ref = runs[0]["ppl"]
    for r in runs:
        r["rel_to_first"] = r["ppl"] / ref - 1
    rel = [abs(r["rel_to_first"]) for r in runs[1:]]
    result = {
        "benchmark": "reference-noise", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "model": str(args.model), "convert": args.convert_cmd, "ppl_protocol": f"Pride and Prejudice, first {args.ppl_tokens} tokens, windows of 512",
        "runs": runs, "max_abs_rel": max(rel, default=0.0), "mean_abs_rel": sum(rel) / len(rel) if rel else 0.0,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"reference-noise-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"max |relative change| {100 * result['max_abs_rel']:.2f}%, mean {100 * result['mean_abs_rel']:.2f}%; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
