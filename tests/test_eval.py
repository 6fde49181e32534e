"""Evaluation harness: `qexpand fetch` / `qexpand eval` CLI, the served scorer (against a fake
server, and against a real `python -m vllm_qexpand.serve` in the slow test)."""
import json
import math
import random
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server import openai_server
from tiny import TEXT, make_tiny_llama
from vllm_qexpand.eval.data import save_task_jsonl
from vllm_qexpand.eval.served import ServedError, ServedScorer

WORDS = ["truth", "fortune", "wife", "man", "neighbourhood", "daughters", "property", "good", "single"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vllm_qexpand.cli", *map(str, args)], capture_output=True, text=True)


def _items(n=12, seed=0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(2, 4)
        start = rng.randrange(0, 200)
        out.append({"context": TEXT[start:start + 60].strip(), "choices": rng.sample(WORDS, k), "label": rng.randrange(k)})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("eval") / "tiny", hidden=64, intermediate=128, heads=4, kv_heads=2)


# --------------------------------------------------------------------------- CLI

def test_fetch_refuses_unknown_model(tmp_path):
    r = _cli("fetch", "llama-9000b", tmp_path / "dst")
    assert r.returncode == 2
    assert "unknown model 'llama-9000b'" in r.stderr and "smollm2-135m" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "dst").exists()


def test_eval_refuses_unknown_task_and_empty_request(tmp_path, tiny):
    r = _cli("eval", tiny, "--tasks", "piqa,hellaswagg")
    assert r.returncode == 2 and "unknown task 'hellaswagg'" in r.stderr and "Traceback" not in r.stderr
    r = _cli("eval", tiny)
    assert r.returncode == 2 and "nothing to evaluate" in r.stderr
    r = _cli("eval", tiny, "--task-file", tmp_path / "missing.jsonl")
    assert r.returncode == 2 and "missing.jsonl" in r.stderr


def test_eval_task_file_equals_evaluate_tasks(tmp_path, tiny):
    from transformers import AutoTokenizer

    from vllm_qexpand.eval.reference import load_model
    from vllm_qexpand.eval.zeroshot import HFScorer, evaluate_tasks

    task = save_task_jsonl(_items(), tmp_path / "mini.jsonl")
    r = _cli("eval", tiny, "--task-file", task, "--limit", "10", "--json", tmp_path / "r.json",
             "--markdown", tmp_path / "r.md", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    got = res["tasks"][str(task)]
    assert got["n"] == 10 and 0 <= got["acc"] <= 1 and 0 <= got["acc_norm"] <= 1
    assert res["backend"] == "reference" and res["limit"] == 10
    want = evaluate_tasks(HFScorer(load_model(tiny)), AutoTokenizer.from_pretrained(tiny), [str(task)], limit=10,
                          progress=False)[str(task)]
    assert got == pytest.approx(want, nan_ok=True)
    table = (tmp_path / "r.md").read_text()
    assert "| mini.jsonl | 10 |" in table and table in r.stdout
    assert "%|" not in r.stderr  # --quiet: no progress bars


# --------------------------------------------------------------------------- served scorer, fake server

def _fake_logprob(tok: int) -> tuple[float, int]:
    return -0.25 - (tok % 7), 1 if tok % 7 == 0 else 3


class _FakeHandler(BaseHTTPRequestHandler):
    """/v1/models and /v1/completions with prompt_logprobs or echo, logprobs from _fake_logprob."""

    def log_message(self, *a):
        pass

    def _send(self, obj, code=200):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send({"data": [{"id": "fake", "max_model_len": 40}]})
        self._send({"error": "no"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if body.get("model") != "fake":
            return self._send({"error": {"message": "model not found"}}, 404)
        prompts = body["prompt"]
        choices = []
        for i, p in enumerate(prompts):
            c = {"index": i, "text": "x"}
            lps = [_fake_logprob(t) for t in p]
            if body.get("echo"):
                c["logprobs"] = {"token_logprobs": [None] + [v for v, _ in lps[1:]] + [-1.0],
                                 "top_logprobs": [None] + [{"a": v if r == 1 else -0.1, "b": v} for v, r in lps[1:]]
                                 + [{"x": -1.0}]}
            else:
                c["prompt_logprobs"] = [None] + [{str(t): {"logprob": v, "rank": r}, "99": {"logprob": -0.1, "rank": 1}}
                                                 if r != 1 else {str(t): {"logprob": v, "rank": r}}
                                                 for t, (v, r) in zip(p[1:], lps[1:])]
            choices.append(c)
        self._send({"choices": choices})


@pytest.fixture()
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
    srv.requests = []
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("api", ["prompt_logprobs", "echo"])
def test_served_scorer_parses_both_apis(fake_server, api):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"  # /v1 is appended
    s = ServedScorer(url, api=api, max_prompts=2)
    assert s.model == "fake" and s.max_length == 38 and s.url.endswith("/v1")
    ids = [5, 7, 14, 3, 21]
    assert s.token_logprobs(ids) == [_fake_logprob(t)[0] for t in ids[1:]]
    pairs = [([1, 2, 3], [7, 14]), ([4], [5]), ([9, 9], [21, 0, 4])]
    got = s.batch(pairs)
    assert got == [(sum(_fake_logprob(t)[0] for t in cont), all(t % 7 == 0 for t in cont)) for _, cont in pairs]
    assert len(fake_server.requests) == 1 + 2  # max_prompts=2: the 3 pairs in two requests
    body = fake_server.requests[-1]
    assert body["max_tokens"] == 1 and body["prompt"] == [[9, 9, 21, 0, 4]]
    assert (body.get("prompt_logprobs") == 1) if api == "prompt_logprobs" else (body["echo"] and body["logprobs"] == 1)
    # left truncation as HFScorer: at most max_length + 1 tokens, the continuation kept whole
    ll, _ = s(list(range(100)), [7, 8])
    assert fake_server.requests[-1]["prompt"][0] == list(range(100))[-37:] + [7, 8]
    assert ll == _fake_logprob(7)[0] + _fake_logprob(8)[0]
    with pytest.raises(ValueError, match="max_model_len 40"):
        s.token_logprobs(list(range(45)))


def test_served_scorer_errors(fake_server):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}/v1"
    with pytest.raises(ServedError, match="does not serve 'other'.*fake"):
        ServedScorer(url, "other")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    with pytest.raises(ServedError, match="cannot reach"):
        ServedScorer(f"http://127.0.0.1:{port}/v1")


# --------------------------------------------------------------------------- a real server (slow)

SERVED_NAME = "tiny-eval"
WINDOW, PPL_TOKENS = 128, 1024


@pytest.fixture(scope="module")
def served(serve_models, tmp_path_factory):
    pytest.importorskip("vllm")
    path = serve_models("w4a4-exp", scheme="w4a4", online=("down_proj", "o_proj"), expand=[("down_proj", 1)])
    tmp = tmp_path_factory.mktemp("eval-server")
    args = ("--served-model-name", SERVED_NAME, "--max-model-len", "512")
    with openai_server(path, tmp / "server.log", *args) as (base, proc):
        yield {"url": base + "/v1", "path": path, "proc": proc, "tmp": tmp}


@pytest.mark.slow
def test_served_matches_reference(served):
    """One server: served perplexity within 0.5% of the torch reference, choice log-likelihoods within
    1e-3 (prompt_logprobs and echo alike), and `qexpand eval --url` gives the served numbers."""
    from transformers import AutoTokenizer

    from vllm_qexpand.eval.perplexity import perplexity
    from vllm_qexpand.eval.reference import load_model
    from vllm_qexpand.eval.zeroshot import HFScorer, score_items

    path, tmp = served["path"], served["tmp"]
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(TEXT * 3)["input_ids"]
    ref = HFScorer(load_model(path))
    srv = ServedScorer(served["url"])  # the only model
    assert srv.model == SERVED_NAME and srv.max_model_len == 512

    p_ref = perplexity(ref, ids, WINDOW, PPL_TOKENS, progress=False)
    p_srv = perplexity(srv, ids, WINDOW, PPL_TOKENS, progress=False)
    assert p_srv["tokens"] == p_ref["tokens"] == (PPL_TOKENS // WINDOW) * (WINDOW - 1)
    assert abs(p_srv["ppl"] / p_ref["ppl"] - 1) < 0.005, (p_srv["ppl"], p_ref["ppl"])

    items = _items(12, seed=1)
    r_ref = score_items(items, ref, tok, progress=False, details=True)
    r_srv = score_items(items, srv, tok, progress=False, details=True)
    r_echo = score_items(items, ServedScorer(served["url"], SERVED_NAME, api="echo"), tok, progress=False, details=True)
    for a, b, c in zip(r_ref["items"], r_srv["items"], r_echo["items"]):
        assert b["lls"] == pytest.approx(a["lls"], abs=1e-3)
        assert c["lls"] == pytest.approx(b["lls"], abs=1e-5)
    assert 0 <= r_srv["acc"] <= 1

    task = save_task_jsonl(items, tmp / "items.jsonl")
    text = tmp / "text.txt"
    text.write_text(TEXT * 3)
    r = _cli("eval", path, "--url", served["url"], "--text", text, "--window", WINDOW, "--max-tokens", PPL_TOKENS,
             "--task-file", task, "--json", tmp / "r.json", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp / "r.json").read_text())
    assert res["backend"] == "served" and res["served_model"] == SERVED_NAME
    assert math.isclose(res["ppl"], p_srv["ppl"], rel_tol=1e-9)
    assert res["tasks"][str(task)]["acc"] == r_srv["acc"]
    assert served["proc"].poll() is None
