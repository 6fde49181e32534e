"""Batch invariance of the quantized linear on CPU (issue 17), no engine.

A token's output must be the same bits whatever the step's token count, the other rows of
the batch and the GEMM layout that count selects, and equal to the torch reference
(``quant.qlinear_codes``): codes are multiplied exactly, scales applied afterwards.
"""
import pytest
import torch
from tiny import random_qlayer

pytest.importorskip("vllm")

from vllm_qexpand.hadamard import hadamard_k, hadamard_transform  # noqa: E402
from vllm_qexpand.plugin import cpu  # noqa: E402
from vllm_qexpand.quant import code_matmul, exact_in_float32, qlinear, qlinear_codes  # noqa: E402
from vllm_qexpand.quant import dequantize_weight  # noqa: E402

CASES = {
    # name: (act_bits, group_size, rotation (size, k, blocks) or None, in_features)
    "w4a4-expanded-down": (4, 0, (384, 12, 1), 320),
    "w4a4-k28": (4, 0, (448, 28, 1), 448),
    "w4a8-plain": (8, 0, None, 128),
    "w4a4-group": (4, 32, (384, 12, 1), 320),
    "w4a4-blocks": (4, 0, (416, 52, 2), 384),
}
LAYOUTS = ("auto", "dense", "int8")


_layer = random_qlayer


def _inputs(tokens, n, seed=1):
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed)) * 3
    x[:, :2] *= 20  # outlier channels
    return x


@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_and_batch_gives_the_reference_bits(case, monkeypatch):
    act_bits, group, rotation, n = CASES[case]
    codes, scale, hk = _layer(act_bits, group, rotation, n)
    bias = torch.randn(codes.shape[0])
    big = _inputs(cpu.INT8_MIN_TOKENS + 37, n)
    ref = qlinear_codes(big, codes, scale, act_bits=act_bits, group_size=group, rotation=rotation, hk=hk) + bias
    # the reference itself: row t of a batch = row t alone
    for t in (0, 5, big.shape[0] - 1):
        alone = qlinear_codes(big[t : t + 1], codes, scale, act_bits=act_bits, group_size=group, rotation=rotation, hk=hk)
        assert torch.equal(alone + bias, ref[t : t + 1])
    seen = set()
    for layout in LAYOUTS:
        if layout == "int8" and group:
            continue
        monkeypatch.setenv(cpu.LAYOUT_ENV, layout)
        gemm = cpu.Gemm.build(codes=codes, scale=scale, dense=None, group_size=group, act_bits=act_bits)
        for tokens in (1, 2, 7, cpu.INT8_MIN_TOKENS - 1, cpu.INT8_MIN_TOKENS, big.shape[0]):
            for start in (0, big.shape[0] - tokens):  # different neighbours
                x = big[start : start + tokens]
                seen.add(gemm.kernel(tokens, True))
                y = cpu.forward(x, gemm, rotation=rotation, hk=hk, act_bits=act_bits, bias=bias)
                assert torch.equal(y, ref[start : start + tokens]), (case, layout, tokens, start)
    assert ("int8" in seen) == (group == 0)  # both kernels met where both exist


def test_float_dequantized_sums_are_not_batch_invariant_but_codes_are():
    """Why codes: the old formulation (dequantized floats) differs by layout; the code GEMM cannot."""
    act_bits, group, rotation, n = CASES["w4a4-k28"]
    codes, scale, hk = _layer(act_bits, group, rotation, n, out=256)
    x = _inputs(200, n)
    w = dequantize_weight(codes, scale)
    float_rows = qlinear(x, w, act_bits=act_bits, rotation=rotation, hk=hk)
    code_rows = qlinear_codes(x, codes, scale, act_bits=act_bits, rotation=rotation, hk=hk)
    assert not torch.equal(float_rows, code_rows)  # the float formulation rounds differently
    assert torch.allclose(float_rows, code_rows, rtol=1e-4, atol=1e-4)  # ... by float rounding only
    for t in (1, 3, 64):
        assert torch.equal(qlinear_codes(x[:t], codes, scale, act_bits=act_bits, rotation=rotation, hk=hk), code_rows[:t])


def test_hadamard_rows_independent_of_batch():
    for k, m in ((12, 384), (28, 448), (140, 140 * 4)):
        x = torch.randn(300, m, generator=torch.Generator().manual_seed(k))
        hk = hadamard_k(k).float()
        full = hadamard_transform(x, k, hk)
        for t in (1, 2, 17):
            assert torch.equal(hadamard_transform(x[-t:], k, hk), full[-t:])
        # still the transform: orthonormal, so the norm is kept
        assert torch.allclose(full.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_exactness_bound():
    assert exact_in_float32(262144, 4) and not exact_in_float32(262145, 4)
    assert exact_in_float32(16384, 8) and not exact_in_float32(16385, 8)
    # past the bound the sums are taken in float64 and rounded once: still the exact integer, rounded
    q = torch.full((1, 20000), -128.0)
    c = torch.full((4, 20000), -8, dtype=torch.int8)
    acc = code_matmul(q, c, 8)
    assert acc.dtype == torch.float32 and acc[0, 0].item() == float(20000 * 1024)


def test_compiled_forward_is_batch_invariant_and_equals_reference():
    """vLLM compiles the model (Inductor, dynamic token dim): rotation + quantization there must give the reference bits."""
    act_bits, group, rotation, n = CASES["w4a4-expanded-down"]
    codes, scale, hk = _layer(act_bits, group, rotation, n)
    gemm = cpu.Gemm.build(codes=codes, scale=scale, dense=None, group_size=group, act_bits=act_bits)

    def f(x):
        return cpu.forward(x, gemm, rotation=rotation, hk=hk, act_bits=act_bits, bias=None)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    big = _inputs(cpu.INT8_MIN_TOKENS + 9, n)
    ref = qlinear_codes(big, codes, scale, act_bits=act_bits, rotation=rotation, hk=hk)
    for t in (1, 3, 17, cpu.INT8_MIN_TOKENS + 9):
        x = big[-t:].clone()
        torch._dynamo.mark_dynamic(x, 0)
        assert torch.equal(compiled(x), ref[-t:]), t
