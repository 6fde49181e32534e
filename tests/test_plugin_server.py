"""`python -m vllm_qexpand.serve` on a loopback port, driven with the `openai` client:
a completion equal to the torch reference's greedy text, a chat completion, 64 concurrent
requests with zero failures; the server is stopped by its PID.
"""
import asyncio

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from server import openai_server  # noqa: E402

pytestmark = pytest.mark.slow
OPTIONS = dict(scheme="w4a4", online=("down_proj", "o_proj"), expand=[("down_proj", 1)])
NAME = "tiny-qexpand"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):
    path = serve_models("w4a4-exp", **OPTIONS)
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "chat.jinja").write_text(CHAT_TEMPLATE)
    log = tmp / "server.log"
    args = ("--served-model-name", NAME, "--max-model-len", "256", "--chat-template", str(tmp / "chat.jinja"))
    with openai_server(path, log, *args) as (base, proc):
        yield {"base": base, "path": path, "proc": proc, "log": log}


def _client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_models_endpoint(server):
    assert [m.id for m in _client(server).models.list().data] == [NAME]


def test_completion_equals_reference_greedy(server):
    from transformers import AutoTokenizer

    from vllm_qexpand.eval.reference import load_model

    prompt = "It is a truth universally acknowledged"
    r = _client(server).completions.create(
        model=NAME, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 8
    tok = AutoTokenizer.from_pretrained(server["path"])
    ids = tok(prompt).input_ids
    assert r.usage.prompt_tokens == len(ids)
    ref = load_model(server["path"])
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
    assert r.choices[0].text == tok.decode(seq[len(ids):])


def test_chat_completion(server):
    r = _client(server).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens == 6


def test_64_concurrent_requests_all_succeed(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=240, max_retries=0)

        async def one(i):
            r = await client.completions.create(
                model=NAME, prompt=f"Request {i}: the", max_tokens=4, temperature=0.8, seed=i,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return r.usage.completion_tokens

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64)), return_exceptions=True), 300)
        finally:
            await client.close()

    results = asyncio.run(run())
    failures = [r for r in results if not isinstance(r, int)]
    assert not failures, failures[:3]
    assert results == [4] * 64
    assert server["proc"].poll() is None
