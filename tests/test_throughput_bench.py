"""benchmarks/throughput.py pieces that need no benchmark run: random models, the GPTQ baseline writer, config choice."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

TINY = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=384)


@pytest.fixture(scope="module")
def tp(benchmark):
    return benchmark("throughput")


def _tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def random_llama(tp, tmp_path_factory):
    return tp.make_random_llama(tmp_path_factory.mktemp("bench") / "rand", tie=False, device="cpu", **TINY)


def test_shapes_and_defaults(tp):
    assert tp.SHAPES["llama-3.2-1b"] == dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8,
                                             vocab=128256, tie=True)  # fmt: skip
    assert tp.SHAPES["llama-3.1-8b"] == dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                                             vocab=128256, tie=False)  # fmt: skip
    assert tp.default_configs(cuda=False) == ["bf16", "fp32", "w4a4", "w4a4-expanded", "w4a8", "w4a16"]
    assert tp.default_configs(cuda=True) == ["bf16", "gptq-marlin", "w4a4", "w4a4-expanded", "w4a16"]
    assert set(tp.ALL) == set(tp.UNQUANTIZED) | set(tp.GPTQ) | set(tp.CONVERT)
    with pytest.raises(SystemExit):
        tp.main(["--shape", "llama-70b"])
    with pytest.raises(SystemExit):
        tp.main(["--configs", "bf16,marlin"])


def test_random_llama_checkpoint(random_llama, tp):
    cfg = json.loads((random_llama / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (256, 512, 2)
    t = _tensors(random_llama)
    assert t["model.embed_tokens.weight"].shape == (384, 256) and t["lm_head.weight"].shape == (384, 256)
    assert t["model.layers.1.self_attn.k_proj.weight"].shape == (128, 256)  # 2 KV heads x head_dim 64
    assert t["model.layers.0.mlp.down_proj.weight"].shape == (256, 512)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert len(t) == 2 + 2 * 9 + 1
    index = json.loads((random_llama / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(t)
    assert (random_llama / "tokenizer.json").exists()
    assert tp.group_size_for(random_llama) == 128


def test_group_size_rule(tp):
    def cfg(h, i, heads, kv):
        return {"hidden_size": h, "intermediate_size": i, "num_attention_heads": heads, "num_key_value_heads": kv}

    smollm2 = tp.linear_shapes(cfg(576, 1536, 9, 3))
    assert smollm2["self_attn.k_proj"] == (576, 192) and smollm2["mlp.down_proj"] == (1536, 576)
    assert not all(k % 128 == 0 for k, _ in smollm2.values())  # 576 = 4.5 x 128: group 64
    assert all(k % 128 == 0 for k, _ in tp.linear_shapes(cfg(4096, 14336, 32, 8)).values())


def test_gptq_baseline_checkpoint(random_llama, tp, tmp_path):
    dst = tp.write_random_gptq(random_llama, tmp_path / "gptq", 128, device="cpu")
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False, "lm_head": False}
    t = _tensors(dst)
    for i in range(2):
        for name, (k, n) in tp.linear_shapes(cfg).items():
            p = f"model.layers.{i}.{name}"
            assert f"{p}.weight" not in t
            assert t[f"{p}.qweight"].shape == (k // 8, n) and t[f"{p}.qweight"].dtype == torch.int32
            assert t[f"{p}.qzeros"].shape == (k // 128, n // 8) and t[f"{p}.qzeros"].dtype == torch.int32
            assert (t[f"{p}.qzeros"] == 0x77777777).all()  # zero point 8 stored as 7: symmetric
            assert t[f"{p}.scales"].shape == (k // 128, n) and t[f"{p}.scales"].dtype == torch.float16
            assert torch.equal(t[f"{p}.g_idx"], torch.arange(k, dtype=torch.int32) // 128)
    src = _tensors(random_llama)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(t[k], src[k])
    assert (dst / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="group size 96"):
        tp.write_random_gptq(random_llama, tmp_path / "bad", 96, device="cpu")
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.quantization import get_quantization_config

    parsed = get_quantization_config("gptq").from_config(qc)  # what vLLM builds from this config
    assert (parsed.weight_bits, parsed.group_size, parsed.desc_act) == (4, 128, False)


def test_convert_args(tp, random_llama):
    assert tp.convert_args("w4a16", random_llama, True) == ["--rtn", "--scheme", "w4a16", "--group-size", "128", "--clip", "none"]
    assert tp.convert_args("w4a4-expanded", random_llama, False) == ["--rtn", "--scheme", "w4a4", "--expand", "down_proj=1"]


def test_random_llama_converts(tp, random_llama, tmp_path):
    """The converter takes the bf16 random model (what the GPU run converts at 1B / 8B sizes)."""
    dst = tp.ensure_converted(random_llama, "w4a16", tmp_path, random_source=True)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["scheme"] == "w4a16" and qc["weights"]["group_size"] == 128 and qc["weights"]["clip"] == "none"
    assert tp.ensure_converted(random_llama, "w4a16", tmp_path, random_source=True) == dst  # cached
