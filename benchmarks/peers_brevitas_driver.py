"""Run Brevitas's LLM example (the expansion authors' code) on our data and perplexity protocol.

    /work/brevitas-venv/bin/python benchmarks/peers_brevitas_driver.py JOB.json OUT.json

Started by benchmarks/peers.py with the interpreter of a venv that has
``brevitas[llm,hadamard]==0.13.4`` (never imported by the vllm-qexpand venv). JOB.json:

    {"model": DIR, "calib": [[token ids] x 16], "eval": [[token ids] x 8],
     "layout": "r2" | "quarot", "gptq": bool, "expand": null | ["down_proj", STEPS], "threads": 1,
     "overrides": {}}   # optional: more quantize_llm args by dest name, for A/Bs (e.g. input_narrow_range)

The recipe is Brevitas's own QuaRot* grid, ``brevitas_examples/papers/expansion/quarot_star.yaml``
(first value of every list), passed to ``brevitas_examples.llm.main.quantize_llm`` as its argparse
defaults, with the overrides listed in ``OVERRIDES`` / ``job_overrides`` (both written to OUT.json).
What is patched, in this process only (site-packages untouched):

- ``main.get_dataset_for_model``: returns our windows (``calib`` for the train split, ``eval``
  otherwise) instead of downloading WikiText2 from the HF hub;
- ``main.compute_perplexity``: our protocol (vllm_qexpand/eval/perplexity.py): every token after
  the first of each window, token-weighted mean NLL, float32 log-softmax (Brevitas's own scores only the
  second half of each window);
- ``llm_quant.gpxq.send_to_device``: its block-sequential GPTQ sends block inputs to 'cuda'
  unconditionally; on a machine without CUDA that target becomes 'cpu';
- ``accelerate_utils.accelerate.calc_cpu_device_map``: the CPU memory budget of its ``offload_model`` is the
  machine's total memory, not 70% of what is free at that moment (on a shared machine the latter falls below the
  model's size and Brevitas stops, asking for a disk offload directory).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Ours, not the yaml's: what differs from quarot_star.yaml for every job, and why.
OVERRIDES = {
    "dtype": "float32",            # yaml: bfloat16 (GPU); our harness scores in float32 on CPU
    "input_quant_type": "sym",     # yaml: asym; symmetric per-token int4 is our scheme (and better here: 83.9 vs 88.2)
    "nsamples": 16,                # yaml: 128 windows of 2048; ours: 16 windows of 512
    "seqlen": 512,
    "few_shot_eval": None,         # yaml: lighteval (needs the hub); perplexity only
    "eval": True,
}


def job_overrides(job: dict) -> dict:
    """The per-config part: GPTQ on/off, layout, expansion."""
    o = {"model": job["model"], "gptq": bool(job["gptq"]),
         # r2 = our layout: R2 per head fused into v_proj/o_proj (Brevitas's SDPA regions), online Hadamard on
         # down_proj only; quarot = QuaRot*: o_proj and down_proj are orphan sinks with an online Hadamard
         "rotation_sdpa_regions": job["layout"] == "r2"}
    if job.get("expand"):
        layer, steps = job["expand"]
        o.update(rotation_layers_to_expand=[layer], expansion_step=int(steps))
    else:
        o.update(rotation_layers_to_expand=[], expansion_step=0)
    o.update(job.get("overrides") or {})
    return o


def recipe_defaults() -> dict:
    import yaml

    import brevitas_examples

    path = Path(brevitas_examples.__file__).parent / "papers" / "expansion" / "quarot_star.yaml"
    grid = yaml.safe_load(path.read_text())
    return {k: (v[0] if isinstance(v, list) and v else v) for k, v in grid.items()}, str(path)


def main() -> int:
    job_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    torch.set_num_threads(int(job.get("threads", 1)))

    import brevitas_examples.llm.llm_quant.gpxq as gpxq
    import brevitas_examples.llm.main as bmain
    from brevitas_examples.common.parse_utils import parse_args
    from brevitas_examples.llm.llm_args import create_args_parser

    calib = [np.asarray([w], dtype=np.int64) for w in job["calib"]]
    evalw = [np.asarray([w], dtype=np.int64) for w in job["eval"]]

    def get_dataset_for_model(*, split="train", nsamples=None, seqlen=None, **_):
        data = calib if split == "train" else evalw
        assert all(d.shape[1] == seqlen for d in data), (split, seqlen)
        return [{"input_ids": d} for d in data]

    eval_s = [0.0]
    scores = []

    @torch.no_grad()
    def compute_perplexity(model, data, context_length=None, tokenizer=None, **_):
        t0 = time.perf_counter()
        model = model.eval()
        device = next(model.parameters()).device
        nll, count = 0.0, 0
        for sample in data:
            x = sample["input_ids"].to(device)
            logits = model(input_ids=x)["logits"]
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            lp = logp.gather(1, x[0, 1:, None])[:, 0]
            nll -= math.fsum(lp.tolist())
            count += x.shape[1] - 1
        eval_s[0] += time.perf_counter() - t0
        ppl = math.exp(nll / count)
        scores.append({"ppl": ppl, "tokens": count})
        return ppl

    send = gpxq.send_to_device

    def send_to_device(tensor, device, *a, **k):
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        return send(tensor, device, *a, **k)

    # accelerate's CPU budget is 70% of the memory *available now* minus 2 GB: on a shared machine it can fall
    # below the model's size and Brevitas then asks for a disk offload dir; the model is on the CPU already,
    # so the budget is the machine's total memory (the placement stays: everything on "cpu")
    import psutil

    import brevitas_examples.common.accelerate_utils.accelerate as bacc

    bacc.calc_cpu_device_map = lambda *a, **k: {"cpu": float(psutil.virtual_memory().total)}
    bmain.get_dataset_for_model = get_dataset_for_model
    bmain.compute_perplexity = compute_perplexity
    gpxq.send_to_device = send_to_device

    defaults, yaml_path = recipe_defaults()
    parser = create_args_parser()
    known = {a.dest for a in parser._actions}
    dropped = sorted(k for k in defaults if k not in known)  # keys of the 0.12.1-era yaml 0.13.4 no longer has
    defaults = {k: v for k, v in defaults.items() if k in known}
    over = {**OVERRIDES, **job_overrides(job)}
    defaults.update(over)
    args, extra = parse_args(parser, [], override_defaults=defaults)

    # parameters of all linears (lm_head included, as `convert` counts them) before/after expansion
    counted = {}
    orig_layerwise = bmain.layerwise_quantize

    def layerwise_quantize(model, **kw):  # runs after rotation/expansion, before quantization
        counted["after"] = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        return orig_layerwise(model=model, **kw)

    bmain.layerwise_quantize = layerwise_quantize
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    counted["before"] = sum(m.weight.numel() for m in ref.modules() if isinstance(m, torch.nn.Linear))
    del ref
    t0 = time.perf_counter()
    result, _model = bmain.quantize_llm(args, extra)
    total = time.perf_counter() - t0
    from brevitas.nn.equalized_layer import RotatedModule

    from brevitas.nn import QuantLinear

    qlin = [m for m in _model.modules() if isinstance(m, QuantLinear)]
    quantized = {"linears": len(qlin),  # what Brevitas quantized: weights and inputs (activations)
                 "weight_quant": sum(bool(m.weight_quant.is_quant_enabled) for m in qlin),
                 "input_quant": sum(bool(m.input_quant.is_quant_enabled) for m in qlin)}
    online = sorted(n.split(".")[-1] for n, m in _model.named_modules()  # layers with an online Hadamard
                    if isinstance(m, RotatedModule) and ".layers.0." in f".{n}.")
    out = {
        "float_ppl": round(result["float_ppl"], 3),
        "ppl": round(result["quant_ppl"], 3),
        "param_overhead": round(counted["after"] / counted["before"] - 1, 6) if "after" in counted else None,
        "seconds": round(total - eval_s[0], 1),
        "eval_seconds": round(eval_s[0], 1),
        "online_layer0": online,
        "quantized": quantized,
        "recipe": {"yaml": yaml_path, "overrides": over, "yaml_keys_unknown_to_0.13.4": dropped,
                   "args": {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (str, int, float, bool, list, type(None)))}},
        "brevitas": __import__("brevitas").__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("float_ppl", "ppl", "param_overhead", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
