import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before any module (ours or
# vLLM's) imports Triton, so the kernel tests run in the interpreter on machines without CUDA
if not os.path.exists("/dev/nvidia0") and not os.environ.get("QEXPAND_TEST_COMPILED"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# A tiny Llama vLLM's CPU attention accepts (head_dim 32; it needs >= 32), shared by tests/test_plugin_*.py
SERVE_SHAPE = dict(hidden=128, intermediate=320, heads=4, kv_heads=2, layers=2)


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory):
    """`get(name, **Options)`: the tiny source (name 'src') or a cached qexpand conversion of it."""
    from tiny import make_tiny_llama
    from vllm_qexpand.converters.pipeline import Options, convert

    root = tmp_path_factory.mktemp("serve-models")
    cache = {"src": make_tiny_llama(root / "src", **SERVE_SHAPE)}

    def get(name: str, **options):
        if name not in cache:
            convert(cache["src"], root / name, Options(progress=False, **options))
            cache[name] = root / name
        return cache[name]

    return get


@pytest.fixture(scope="session")
def break_checkpoint():
    """`make(good_dir, dst_dir, kind)`: a copy of a qexpand dir with one defect (returns (dst, culprit))."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    def make(good, dst, kind):
        shutil.copytree(good, dst)
        wmap = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
        name = {
            "truncated": "model.layers.1.mlp.down_proj.weight_packed",
            "scale_shape": "model.layers.0.mlp.gate_proj.weight_scale",
            "missing": "model.layers.1.self_attn.k_proj.weight_scale",
            "packed_dtype": "model.layers.0.self_attn.o_proj.weight_packed",
        }[kind]
        shard = dst / wmap[name]
        if kind == "truncated":
            data = shard.read_bytes()
            shard.write_bytes(data[: len(data) - 100])
            return dst, shard.name
        tensors = load_file(shard)
        if kind == "scale_shape":
            tensors[name] = tensors[name].repeat(1, 2)
        elif kind == "missing":
            del tensors[name]
            index = json.loads((dst / "model.safetensors.index.json").read_text())
            del index["weight_map"][name]
            (dst / "model.safetensors.index.json").write_text(json.dumps(index))
        elif kind == "packed_dtype":
            tensors[name] = tensors[name].float()
        save_file(tensors, shard, metadata={"format": "pt"})
        return dst, name

    return make
