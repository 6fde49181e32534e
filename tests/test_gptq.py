"""GPTQ: lower output error than round-to-nearest, on its own and inside the converter."""
import torch

from tiny import TEXT, make_tiny_llama
from vllm_qexpand.converters.clip import choose_scale
from vllm_qexpand.converters.gptq import gptq_quantize, hessian
from vllm_qexpand.converters.pipeline import convert
from vllm_qexpand.converters.state import Options
from vllm_qexpand.eval.reference import load_model
from vllm_qexpand.quant import dequantize_weight, quantize_weight


def _correlated(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    return torch.randn(n, k, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)


def test_gptq_beats_rtn_on_correlated_inputs():
    x, w = _correlated(2048, 128, 0), torch.randn(64, 128)
    for group in (0, 32):
        scale = choose_scale(w, group, "none")
        rtn = dequantize_weight(quantize_weight(w, scale, group), scale, group)
        q = gptq_quantize(w, hessian(x), scale, group)
        assert int(q.min()) >= -8 and int(q.max()) <= 7
        gq = dequantize_weight(q, scale, group)
        err = lambda ww: ((x @ (ww - w).t()) ** 2).mean().item()  # noqa: E731
        assert err(gq) < 0.7 * err(rtn), (group, err(gq), err(rtn))


def test_gptq_handles_rank_deficient_expanded_hessian():
    # an expanded layer: 96 real inputs padded to 104 and rotated -> Hessian rank <= 96
    from vllm_qexpand.quant import online_rotate
    x = online_rotate(_correlated(1024, 96, 1).double(), 104, 52).float()
    w = torch.randn(32, 104)
    scale = choose_scale(w, 0, "none")
    q = gptq_quantize(w, hessian(x), scale)
    assert torch.isfinite(q.float()).all()


def test_converter_gptq_lowers_model_error(tmp_path):
    src = make_tiny_llama(tmp_path / "src", hidden=64, intermediate=192)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 8)
    common = dict(scheme="w4a16", group_size=16, expand=[("down_proj", 1)], progress=False, calib_samples=4, calib_len=64)
    convert(src, tmp_path / "rtn", Options(**common))
    convert(src, tmp_path / "gptq", Options(**common, gptq=True, calib=calib))
    ids = torch.tensor([list(range(5, 69)), list(range(100, 164))])
    with torch.no_grad():
        ref = load_model(src)(ids).logits
        e = {n: (load_model(tmp_path / n)(ids).logits - ref).norm().item() for n in ("rtn", "gptq")}
    assert e["gptq"] < e["rtn"], e


def test_saliency_weighted_clip_lowers_its_own_objective():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    imp = torch.rand(64, generator=g) ** 4 * 10  # a few salient inputs
    plain, weighted = choose_scale(w, 0, "mse"), choose_scale(w, 0, "mse", imp)
    assert not torch.equal(plain, weighted)
    obj = lambda s: (imp * (dequantize_weight(quantize_weight(w, s), s) - w) ** 2).sum()  # noqa: E731
    assert obj(weighted) <= obj(plain)
    assert obj(weighted) < obj(choose_scale(w, 0, "none"))


def test_saliency_needs_calibration_text(tmp_path):
    import pytest

    from vllm_qexpand.converters.state import ConvertError
    src = make_tiny_llama(tmp_path / "src")
    with pytest.raises(ConvertError, match="--saliency needs a calibration text"):
        convert(src, tmp_path / "x", Options(saliency="act", progress=False))
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT * 8)
    r = convert(src, tmp_path / "x", Options(saliency="act", calib=calib, calib_samples=2, calib_len=64, progress=False))
    assert len(r["layers"]) == 14


def _gptq_hessians(tmp_path, monkeypatch, src, calib, **opts):
    """The Hessian every gptq_quantize call got, in call order (q, k, v, o, gate, up, down per layer)."""
    from vllm_qexpand.converters import quantize

    seen = []
    monkeypatch.setattr(quantize, "gptq_quantize",
                        lambda w, h, *a, **k: seen.append(h.clone()) or gptq_quantize(w, h, *a, **k))
    name = "seq" if opts.get("sequential") else "par"
    report = convert(src, tmp_path / name, Options(scheme="w4a4", gptq=True, calib=calib, calib_samples=4, calib_len=64,
                                                   progress=False, **opts))
    return seen, report


def test_sequential_gptq_takes_o_and_down_hessians_from_the_quantized_layer(tmp_path, monkeypatch):
    src = make_tiny_llama(tmp_path / "src", hidden=64, intermediate=192)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 8)
    par, _ = _gptq_hessians(tmp_path, monkeypatch, src, calib, sequential=False)
    seq, report = _gptq_hessians(tmp_path, monkeypatch, src, calib, sequential=True)
    assert len(par) == len(seq) == 14 and "sequential in-layer" in report["recipe"]
    q, k, v, o, gate, up, down = range(7)
    for i in (q, k, v):  # layer 0's q/k/v read the same float input either way
        assert torch.equal(par[i], seq[i])
    for i in (o, gate, up, down):  # o_proj sees quantized q/k/v, gate/up the quantized attention, down quantized gate/up
        rel = ((par[i] - seq[i]).norm() / par[i].norm()).item()
        assert rel > 1e-4, (i, rel)
