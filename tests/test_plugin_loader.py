"""vLLM's model loader + QExpandLinearMethod in this process (no engine, no KV cache, no compile).

- every scheme (w4a4, w4a8, w4a4 with an activation clip, w4a16 with groups, none): each fused/expanded vLLM linear
  equals the torch reference's QLinear(s) (eval/reference.py) on random inputs (w4a4 and
  w4a8 bit for bit: integer-exact GEMM);
- worker-side refusal: tensors vLLM would leave uninitialised, or of the wrong shape/dtype,
  fail inside the loader with the checkpoint tensor's name (the pre-flight is bypassed
  by loading the bad files under a config built from the good dir);
- TP: a row-parallel layer with a full online rotation is refused for TP > 1.
"""
import json

import pytest
import torch

pytest.importorskip("vllm")

from vllm_qexpand.eval.reference import load_model  # noqa: E402
from vllm_qexpand.format import FormatError  # noqa: E402

SCHEMES = {
    "w4a4": dict(scheme="w4a4", online=("down_proj", "o_proj"), expand=[("down_proj", 1)]),
    "w4a8": dict(scheme="w4a8", online=("down_proj",), expand=[("down_proj", 2)]),
    "w4a4-clip": dict(scheme="w4a4", act_clip=0.6, online=("down_proj",), expand=[("down_proj", 1)]),  # format v2
    "w4a16": dict(scheme="w4a16", group_size=32, online=("down_proj",), expand=[("down_proj", 1)]),
    "none": dict(scheme="none", online=("down_proj", "o_proj"), expand=[("down_proj", 1)]),
}
FUSED = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
         "self_attn.o_proj": ["self_attn.o_proj"],
         "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
         "mlp.down_proj": ["mlp.down_proj"]}  # fmt: skip


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_linear_matches_reference(scheme, serve_models, load_vllm):
    path = serve_models(scheme, **SCHEMES[scheme])
    model = load_vllm(path)
    ref = load_model(path)
    online = json.loads((path / "config.json").read_text())["quantization_config"]["online"]
    g = torch.Generator().manual_seed(0)
    for i in range(len(ref.model.layers)):
        for fused, parts in FUSED.items():
            layer = model.get_submodule(f"model.layers.{i}.{fused}")
            assert type(layer.quant_method).__name__ == "QExpandLinearMethod"
            x = torch.randn(9, layer.input_size, generator=g)
            x[:, :3] *= 10
            with torch.no_grad():
                y = layer(x)
                y = y[0] if isinstance(y, tuple) else y
                want = torch.cat([ref.get_submodule(f"model.layers.{i}.{p}")(x) for p in parts], dim=-1)
            if SCHEMES[scheme]["scheme"] in ("w4a4", "w4a8"):  # integer-exact GEMM: the fused vLLM layer gives the reference's bits
                assert torch.equal(y, want), (scheme, i, fused, (y - want).abs().max().item())
            err = (y - want).abs().max() / want.abs().max()
            assert err < 1e-5, (scheme, i, fused, err.item())
            assert (layer.quant_method.rotation is not None) == (f"model.layers.{i}.{fused}" in online)


@pytest.mark.parametrize("kind", ["missing", "scale_shape", "packed_dtype"])
def test_worker_refuses_bad_tensors_by_name(kind, serve_models, break_checkpoint, load_vllm, tmp_path):
    good = serve_models("w4a4", **SCHEMES["w4a4"])
    bad, culprit = break_checkpoint(good, tmp_path / kind, kind)
    with pytest.raises(FormatError, match=culprit.replace(".", r"\.")):
        load_vllm(good, weights_dir=bad)


def test_tp_refused_for_full_online_rotation_on_row_parallel(serve_models, load_vllm):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_qexpand.plugin.config import QExpandConfig
    from vllm_qexpand.plugin.linear import QExpandLinearMethod

    path = serve_models("w4a4", **SCHEMES["w4a4"])
    load_vllm(path)  # makes sure the TP groups exist (parameters ask for the TP rank)

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    cfg = QExpandConfig.from_config(qc)
    layer = RowParallelLinear.__new__(RowParallelLinear)
    torch.nn.Module.__init__(layer)
    layer.tp_size = 2
    method = QExpandLinearMethod(cfg, "model.layers.0.mlp.down_proj")
    with pytest.raises(NotImplementedError, match="tensor parallelism 2"):
        method.create_weights(layer, 160, [128], 320, 128, torch.float32, weight_loader=lambda *a, **k: None)
    # a block-diagonal rotation whose block count the TP size divides is served per rank
    qc["online"]["model.layers.0.mlp.down_proj"] = {"in_features": 320, "size": 384, "k": 12, "blocks": 2}
    method = QExpandLinearMethod(QExpandConfig.from_config(qc), "model.layers.0.mlp.down_proj")
    method.create_weights(layer, 160, [128], 320, 128, torch.float32, weight_loader=lambda *a, **k: None)
    assert layer.weight_packed.shape == (128, 192 // 8) and method.rotation == (192, 12, 1)
