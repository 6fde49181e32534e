"""Tensor parallelism on real vLLM engines (CPU, eager, float32), tracker issue 7.

A w4a4 checkpoint converted with ``--tp-blocks 2`` (block-diagonal online Hadamard on down_proj,
expanded per block) serves at TP=2 with the same greedy text and prompt logprobs as at TP=1; a
checkpoint with one block (the default) is refused at TP=2 with a message naming the TP sizes it
serves and how to convert for TP=2.

Each engine runs in its own Python process (``ENGINE`` below, run with ``python -c``): engines with
different TP sizes then coexist in one pytest process, and their memory and worker processes go
away with them. Three engine starts in all: TP=1, TP=2, and the refused TP=2.
"""
import json

import pytest
import torch
from server import run_engine_script

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

OPTIONS = dict(scheme="w4a4", tp_blocks=2, expand=[("down_proj", 1)])  # online down_proj (the default)
PROMPT_LENS = (24, 7, 70, 13)  # 70 >= INT8_MIN_TOKENS: its prefill runs the int8 GEMM
NEW_TOKENS = 12
TIMEOUT_S = 300

# One engine: argv[1] is a JSON object {path, tp, prompts, new_tokens}; prints one line "RESULT <json>".
ENGINE = r"""
import json, sys
args = json.loads(sys.argv[1])
from vllm import LLM, SamplingParams
llm = LLM(model=args["path"], dtype="float32", tensor_parallel_size=args["tp"], enforce_eager=True,
          max_model_len=256, max_num_seqs=8, kv_cache_memory_bytes=64 << 20, seed=0)
sp = SamplingParams(temperature=0, max_tokens=args["new_tokens"], prompt_logprobs=0, ignore_eos=True)
outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], sp, use_tqdm=False)
print("RESULT " + json.dumps({
    "logprobs": [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs],
    "greedy": [list(o.outputs[0].token_ids) for o in outs],
    "text": [o.outputs[0].text for o in outs],
    "quantization": llm.llm_engine.vllm_config.model_config.quantization,
}), flush=True)
llm.llm_engine.engine_core.shutdown()
"""


def make_prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_engine(path, tp, tmp_path):
    """(returncode, result dict or None, full log) of one engine in a fresh process."""
    args = {"path": str(path), "tp": tp, "prompts": make_prompts(), "new_tokens": NEW_TOKENS}
    return run_engine_script(ENGINE, args, tmp_path / f"engine-tp{tp}.log", workers=tp, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def blocked(serve_models):
    return serve_models("w4a4-tp2-exp", **OPTIONS)


@pytest.fixture(scope="module")
def tp1(blocked, tmp_path_factory):
    rc, result, log = run_engine(blocked, 1, tmp_path_factory.mktemp("tp1"))
    assert rc == 0 and result is not None, log[-6000:]
    return result


@pytest.fixture(scope="module")
def tp2(blocked, tmp_path_factory):
    rc, result, log = run_engine(blocked, 2, tmp_path_factory.mktemp("tp2"))
    assert rc == 0 and result is not None, log[-6000:]
    return result


def test_checkpoint_has_two_expanded_blocks(blocked):
    online = json.loads((blocked / "config.json").read_text())["quantization_config"]["online"]
    assert set(online) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    # 320 inputs = 2 blocks of 160, each expanded one step to 192 = 12·16; each rank holds one block
    assert all(spec == {"in_features": 320, "size": 384, "k": 12, "blocks": 2} for spec in online.values()), online


def test_tp2_greedy_text_matches_tp1(tp1, tp2):
    assert tp1["quantization"] == tp2["quantization"] == "qexpand"
    assert tp2["greedy"] == tp1["greedy"]
    assert tp2["text"] == tp1["text"]


def test_tp2_prompt_logprobs_match_tp1(tp1, tp2):
    for n, got, want in zip(PROMPT_LENS, tp2["logprobs"], tp1["logprobs"]):
        got, want = torch.tensor(got), torch.tensor(want)
        assert got.shape == want.shape == (n - 1,)
        assert (got - want).abs().mean() <= 1e-4, (got - want).abs().max()


def test_one_block_checkpoint_refused_at_tp2(serve_models, tmp_path):
    path = serve_models("w4a4-b1", scheme="w4a4")  # online down_proj over all 320 inputs, --tp-blocks 1
    rc, result, log = run_engine(path, 2, tmp_path)
    assert rc != 0 and result is None, log[-6000:]
    msg = [ln for ln in log.splitlines() if "NotImplementedError: qexpand: model.layers.0.mlp.down_proj" in ln]
    assert msg, log[-6000:]
    assert "This checkpoint serves only at --tensor-parallel-size 1;" in msg[0], msg[0]
    assert "to serve at 2, convert with --tp-blocks 2 (or a multiple of 2" in msg[0], msg[0]
