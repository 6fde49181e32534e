"""End to end on vLLM (one engine, eager, float32): a w4a4 checkpoint with down_proj expanded and
online o_proj/down_proj rotations serves the same logprobs and greedy text as the torch reference.
"""
import gc
import os

import pytest
import torch
from tiny import reference_outputs

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow
OPTIONS = dict(scheme="w4a4", online=("down_proj", "o_proj"), expand=[("down_proj", 1)])
PROMPT_LENS = (24, 7, 70, 13)  # 70 >= INT8_MIN_TOKENS: its prefill runs the int8 GEMM
NEW_TOKENS = 12


def make_prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_engine(path, prompts, new_tokens, trace, **llm_kwargs):
    """Prompt logprobs, greedy tokens and the plugin's trace lines from a vLLM engine started (and shut down) here."""
    from vllm import LLM, SamplingParams

    old = os.environ.get("VLLM_QEXPAND_TRACE")
    os.environ["VLLM_QEXPAND_TRACE"] = str(trace)  # inherited by vLLM's spawned processes
    try:
        llm = LLM(model=str(path), dtype="float32", max_model_len=256, max_num_seqs=8, kv_cache_memory_bytes=64 << 20,
                  seed=0, **llm_kwargs)  # fmt: skip
        try:
            sp = SamplingParams(temperature=0, max_tokens=new_tokens, prompt_logprobs=0, ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            quant = llm.llm_engine.vllm_config.model_config.quantization
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    finally:
        if old is None:
            os.environ.pop("VLLM_QEXPAND_TRACE", None)
        else:
            os.environ["VLLM_QEXPAND_TRACE"] = old
    lps = [torch.tensor([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]) for o in outs]
    return {
        "logprobs": lps,
        "greedy": [list(o.outputs[0].token_ids) for o in outs],
        "quantization": quant,
        "trace": trace.read_text().splitlines() if trace.exists() else [],
        "path": path,
    }


def kernels_by_layer(trace_lines):
    """layer -> set of CPU GEMM kernels the worker ran for it (int8 / dense)."""
    out = {}
    for ln in trace_lines:
        if ln.startswith("kernel "):
            _, _, layer, kernel, *_ = ln.split()
            out.setdefault(layer, set()).add(kernel)
    return out


@pytest.fixture(scope="module")
def served(serve_models, tmp_path_factory):
    path = serve_models("w4a4-exp", **OPTIONS)
    trace = tmp_path_factory.mktemp("trace") / "trace.txt"
    return run_engine(path, make_prompts(), NEW_TOKENS, trace, enforce_eager=True)


@pytest.fixture(scope="module")
def reference(served):
    return reference_outputs(served["path"], make_prompts(), NEW_TOKENS)


def test_quantization_detected_from_config(served):
    assert served["quantization"] == "qexpand"


def test_prompt_logprobs_match_reference(served, reference):
    for got, want in zip(served["logprobs"], reference[0]):
        assert got.shape == want.shape
        assert (got - want).abs().mean() <= 1e-3, (got - want).abs().max()


def test_greedy_matches_reference(served, reference):
    assert served["greedy"] == reference[1]


def test_plugin_ran_in_spawned_worker(served):
    lines = served["trace"]
    loads = [ln for ln in lines if ln.startswith("load ")]
    applies = [ln for ln in lines if ln.startswith("apply ")]
    pids = {ln.split()[1] for ln in loads + applies}
    assert pids and f"pid={os.getpid()}" not in pids  # not this process: vLLM's worker
    assert len(loads) == 2 * 4 and len(applies) == 2 * 4  # 2 layers × qkv, o, gate_up, down
    down = [ln for ln in loads if "mlp.down_proj" in ln]
    o = [ln for ln in loads if "self_attn.o_proj" in ln]
    assert all("rotation=(384, 12, 1)" in ln for ln in down), down  # 320 expanded to 384 = 12·32
    assert all("rotation=(128, 1, 1)" in ln for ln in o), o
    assert all("layout=int8+dense" in ln for ln in loads), loads  # w4a4 per channel on oneDNN: both kernels
    # the 70-token prefill ran the int8 GEMM, decode (<= 4 sequences) the dense one, in every layer
    assert kernels_by_layer(lines) == {ln.split()[2]: {"int8", "dense"} for ln in loads}
