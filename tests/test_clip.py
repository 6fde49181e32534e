"""Clip rules (none, mse, kl-j, kl): valid scales, and each lowers its own objective vs absmax."""
import pytest
import torch

from vllm_qexpand.converters.clip import CLIP_RULES, choose_scale, objective


def _heavy(rows=16, cols=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t(3) tails (as raw LLM weights) plus a few very large outliers
    t = torch.distributions.StudentT(3.0).sample((rows, cols))
    t[torch.rand(rows, cols, generator=g) < 0.002] *= 10
    return t


@pytest.mark.parametrize("rule", CLIP_RULES)
@pytest.mark.parametrize("group", [0, 128])
def test_clip_rule_scale_is_valid_and_lowers_its_objective(rule, group):
    torch.manual_seed(0)
    w = _heavy()
    s = choose_scale(w, group, rule)
    assert s.shape == (16, 1 if group == 0 else 1024 // group)
    assert s.dtype == torch.float32 and bool((s > 0).all()) and bool(torch.isfinite(s).all())
    absmax = choose_scale(w, group, "none")
    assert bool((s <= absmax * (1 + 1e-6)).all())  # a clip never widens the range
    own, ref = objective(w, s, group, rule), objective(w, absmax, group, rule)
    assert own.shape == s.shape and bool(torch.isfinite(own).all())
    if rule == "none":
        assert torch.equal(own, ref)
    else:
        assert bool((own <= ref + 1e-6).all())  # never worse in any channel / group (absmax is a candidate)
        assert own.sum() < ref.sum(), (rule, own.sum(), ref.sum())


def test_kl_rule_handles_zero_and_constant_rows():
    w = torch.zeros(3, 256)
    w[1] = 0.5
    w[2, ::2] = -1.0
    s = choose_scale(w, 0, "kl")
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    assert torch.isfinite(objective(w, s, 0, "kl")).all()


def test_kl_rule_per_channel_is_close_to_the_mse_search_in_weight_error():
    # data-free KL clip vs absmax on heavy tails, per channel: most of the MSE search's gain
    w = _heavy(cols=4096, seed=1)
    mse = lambda s: objective(w, s, 0, "mse").sum()  # noqa: E731
    e_none, e_mse, e_kl = mse(choose_scale(w, 0, "none")), mse(choose_scale(w, 0, "mse")), mse(choose_scale(w, 0, "kl"))
    assert e_kl < 0.6 * e_none and e_kl < 1.5 * e_mse, (e_none, e_mse, e_kl)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown clip rule"):
        choose_scale(torch.randn(2, 8), 0, "kl2")
    with pytest.raises(ValueError, match="unknown clip rule"):
        objective(torch.randn(2, 8), torch.ones(2, 1), 0, "kl2")


def test_group_notes_for_histogram_rules(tmp_path):
    """At group size 64 kl-j has one candidate (absmax: the scales of --clip none); both histogram rules say so."""
    from tiny import make_tiny_llama

    from vllm_qexpand.converters.pipeline import Options, convert

    w = _heavy(8, 512)
    assert torch.equal(choose_scale(w, 64, "kl-j"), choose_scale(w, 64, "none"))
    assert not torch.equal(choose_scale(w, 128, "kl-j"), choose_scale(w, 128, "none"))
    src = make_tiny_llama(tmp_path / "src")
    for rule, text in (("kl-j", "only absmax"), ("kl", "prefer --clip mse")):
        report = convert(src, tmp_path / rule, Options(scheme="w4a16", group_size=64, clip=rule, progress=False))
        assert any(text in n for n in report["notes"]), report["notes"]
    report = convert(src, tmp_path / "mse", Options(scheme="w4a16", group_size=64, clip="mse", progress=False))
    assert not any("--clip" in n for n in report["notes"])
