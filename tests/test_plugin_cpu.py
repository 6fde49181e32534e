"""The plugin's CPU path (plugin/cpu.py) against the reference math (quant.qlinear), no engine."""
import pytest
import torch
from tiny import random_qlayer

pytest.importorskip("vllm")

from vllm_qexpand.hadamard import hadamard_k  # noqa: E402
from vllm_qexpand.plugin import cpu  # noqa: E402
from vllm_qexpand.quant import dequantize_weight, qlinear  # noqa: E402

CASES = {
    # name: (act_bits, group_size, rotation (size, k, blocks) or None, in_features)
    "w4a4-expanded-down": (4, 0, (384, 12, 1), 320),
    "w4a4-pow2-o": (4, 0, (128, 1, 1), 128),
    "w4a8-plain": (8, 0, None, 128),
    "w4a16-group": (None, 32, (384, 12, 1), 320),
    "w4a4-blocks": (4, 0, (416, 52, 2), 384),
}


_layer = random_qlayer


# the int8 layout exists only for quantized activations with per-channel scales
LAYOUT_CASES = [(c, lay) for c in CASES for lay in ("auto", "dense", "int8")
                if lay != "int8" or (CASES[c][0] is not None and CASES[c][1] == 0)]


@pytest.mark.parametrize("case,layout", LAYOUT_CASES)
def test_forward_matches_reference(case, layout, monkeypatch):
    act_bits, group, rotation, n = CASES[case]
    per_channel_quant = act_bits is not None and group == 0
    monkeypatch.setenv(cpu.LAYOUT_ENV, layout)
    codes, scale, hk = _layer(act_bits, group, rotation, n)
    gemm = cpu.Gemm.build(codes=codes, scale=scale, dense=None, group_size=group, act_bits=act_bits)
    if layout == "auto":
        assert gemm.layout == ("int8+dense" if per_channel_quant else "dense")
    bias = torch.randn(codes.shape[0])
    w = dequantize_weight(codes, scale, group)
    for tokens in (7, cpu.INT8_MIN_TOKENS + 5):  # decode-sized and prefill-sized batches
        x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1)) * 3
        x[:, :2] *= 20  # outlier channels
        ref = qlinear(x, w, act_bits=act_bits, rotation=rotation, hk=hk) + bias
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            y = cpu.forward(x.to(dtype), gemm, rotation=rotation, hk=hk, act_bits=act_bits, bias=bias)
            assert y.dtype == dtype and y.shape == ref.shape
            ref_d = qlinear(x.to(dtype), w, act_bits=act_bits, rotation=rotation, hk=hk) + bias
            err = (y.float() - ref_d.to(dtype).float()).abs().max() / ref.abs().max()
            assert err <= tol, (case, tokens, dtype, err)


def test_scheme_none_dense_float_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 384, generator=g)
    hk = hadamard_k(12).float()
    gemm = cpu.Gemm.build(codes=None, scale=None, dense=w, group_size=0, act_bits=None)
    assert gemm.layout.startswith("dense")
    x = torch.randn(5, 320, generator=g)
    ref = qlinear(x, w, act_bits=None, rotation=(384, 12, 1), hk=hk)
    y = cpu.forward(x, gemm, rotation=(384, 12, 1), hk=hk, act_bits=None, bias=None)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_block_diagonal_rotation_splits_across_tp_ranks(tp):
    """What a row-parallel rank computes with --tp-blocks B (B % tp == 0) sums to the full layer."""
    act_bits, size, k, blocks, n = None, 832, 52, 4, 768  # 4 blocks of 192 -> 208 = 52·4
    codes, scale, hk = _layer(act_bits, 0, (size, k, blocks), n)
    x = torch.randn(6, n, generator=torch.Generator().manual_seed(2))
    full = qlinear(x, dequantize_weight(codes, scale), act_bits=None, rotation=(size, k, blocks), hk=hk)
    parts = []
    for r in range(tp):
        xs = x[:, r * n // tp : (r + 1) * n // tp]
        cs = codes[:, r * size // tp : (r + 1) * size // tp]
        gemm = cpu.Gemm.build(codes=cs, scale=scale, dense=None, group_size=0, act_bits=None)
        parts.append(cpu.forward(xs, gemm, rotation=(size // tp, k, blocks // tp), hk=hk, act_bits=None, bias=None))
    assert torch.allclose(sum(parts), full, atol=1e-4, rtol=1e-4)


def test_compiles_fullgraph_with_dynamic_tokens():
    """vLLM compiles the model with fullgraph=True and a dynamic token dim: no graph breaks allowed."""
    act_bits, group, rotation, n = CASES["w4a4-expanded-down"]
    codes, scale, hk = _layer(act_bits, group, rotation, n)
    gemm = cpu.Gemm.build(codes=codes, scale=scale, dense=None, group_size=group, act_bits=act_bits)
    w = dequantize_weight(codes, scale, group)

    def f(x):
        return cpu.forward(x, gemm, rotation=rotation, hk=hk, act_bits=act_bits, bias=None)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for t in (3, 17, cpu.INT8_MIN_TOKENS + 3):  # one graph; the GEMM op picks its kernel per call
        x = torch.randn(t, n)
        torch._dynamo.mark_dynamic(x, 0)  # as vLLM does: the token dim is dynamic, the rest static
        ref = qlinear(x, w, act_bits=act_bits, rotation=rotation, hk=hk)
        assert torch.allclose(compiled(x), ref, atol=1e-4, rtol=1e-5)
