"""--expand-budget: selective, progressive expansion chosen by measured output error per parameter, kept only
if the held-out loss of the round-to-nearest model falls; --r1-candidates: R1 chosen by that same loss."""
import json
import subprocess
import sys

import pytest
import torch

from tiny import TEXT, make_tiny_llama
from vllm_qexpand.converters.budget import _greedy, rtn_output_error
from vllm_qexpand.converters.clip import choose_scale
from vllm_qexpand.converters.pipeline import convert
from vllm_qexpand.converters.state import ConvertError, Options
from vllm_qexpand.eval.reference import load_model
from vllm_qexpand.hadamard import next_size
from vllm_qexpand.quant import dequantize_weight, online_rotate, quantize_weight

CALIB = dict(calib_samples=4, calib_len=64, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    src = make_tiny_llama(root / "src", hidden=64, intermediate=192, heads=4, kv_heads=2)
    calib = root / "calib.txt"
    calib.write_text(TEXT * 8)
    return src, calib


def _logits(path, ids):
    with torch.no_grad():
        return load_model(path)(ids).logits


@pytest.mark.parametrize("blocks,group", [(1, 0), (2, 0), (2, 16)])
def test_criterion_equals_output_error_on_rotated_expanded_inputs(blocks, group):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=g, dtype=torch.float64) @ torch.randn(96, 96, generator=g, dtype=torch.float64)
    x[:, :2] *= 8  # outlier inputs
    w = torch.randn(24, 96, generator=g, dtype=torch.float64)
    from vllm_qexpand.converters.gptq import hessian
    h = hessian(x)
    for size, k in ((96, 12), (104 if blocks == 1 else 112, 52 if blocks == 1 else 28), (128, 1)):
        if group and (size // blocks) % group:
            continue
        wm = online_rotate(w, size, k, blocks=blocks).float()
        s = choose_scale(wm, group, "mse")
        e = (dequantize_weight(quantize_weight(wm, s, group), s, group) - wm).double()
        direct = 2 * ((online_rotate(x, size, k, blocks=blocks) @ e.t()) ** 2).sum().item() / x.shape[0]
        got = rtn_output_error(w, h, size, k, blocks, group, "mse")
        assert abs(got - direct) <= 1e-4 * direct, (size, got, direct)


def test_greedy_takes_best_reduction_per_parameter_within_budget():
    def c(steps, added, err):
        return {"steps": steps, "size": 100 + added, "k": 1, "added_params": added, "error": err}
    table = {
        "a": [c(0, 0, 10.0), c(1, 10, 9.0), c(2, 20, 5.0)],  # step 1 alone is poor; 0 -> 2 is 0.25/param
        "b": [c(0, 0, 4.0), c(1, 10, 2.0), c(2, 40, 1.9)],   # 0.2/param, then 0.0033/param
        "c": [c(0, 0, 3.0), c(1, 5, 3.5)],                   # expansion that hurts: never taken
    }
    used, moves, chosen = _greedy(table, 30)
    assert [(m["layer"], m["to_size"]) for m in moves] == [("a", 120), ("b", 110)]
    assert used == 30 and chosen == {"a": 2, "b": 1}
    used, moves, chosen = _greedy(table, 19)  # a's jump no longer fits: b first, then nothing fits
    assert used <= 19 and chosen == {"b": 1}
    assert _greedy(table, 0) == (0, [], {})


@pytest.mark.parametrize("blocks", [1, 2])
def test_budget_respected_choices_reported_and_function_preserved(tmp_path, tiny, blocks):
    src, calib = tiny
    budget = 0.03
    r = convert(src, tmp_path / "b", Options(scheme="none", online=("down_proj", "o_proj"), tp_blocks=blocks,
                                             expand_budget=budget, calib=calib, **CALIB))
    eb = r["expand_budget"]
    assert 0 < r["param_overhead"] <= budget and eb["param_overhead"] <= budget
    assert eb["added_params"] <= eb["budget_params"] <= budget * eb["linear_params"]
    assert eb["added_params"] == r["linear_params_expanded"] - r["linear_params"]
    assert eb["chosen"] and eb["moves"] and set(eb["candidates"]) == set(r["online"])  # every online layer scored
    for name, c in eb["chosen"].items():
        spec = r["online"][name]
        assert spec["size"] == c["size"] > c["in_features"] == spec["in_features"] and spec["blocks"] == blocks
        assert spec["size"] == blocks * next_size(c["in_features"] // blocks, c["steps"], multiple=8)  # per block
        assert c["error"] < c["error_unexpanded"] and c["reduction"] > 0 and 0 < c["relative_reduction"] < 1
        steps = {x["steps"]: x["error"] for x in eb["candidates"][name]}
        assert steps[0] == c["error_unexpanded"] and steps[c["steps"]] == c["error"]
    for name, spec in r["online"].items():
        if name not in eb["chosen"]:
            assert spec["size"] == spec["in_features"]
    ratios = [m["reduction_per_param"] for m in eb["moves"]]
    assert all(x > 0 for x in ratios)
    assert json.loads((tmp_path / "b" / "qexpand_report.json").read_text())["expand_budget"] == eb
    ids = torch.randint(0, 300, (2, 24))
    a, b = _logits(src, ids), _logits(tmp_path / "b", ids)
    assert (a - b).abs().max() / a.abs().max() <= 1e-4  # expansion leaves the float function unchanged


def test_zero_budget_expands_nothing(tmp_path, tiny):
    src, calib = tiny
    r = convert(src, tmp_path / "z", Options(scheme="w4a4", expand_budget=0.0, calib=calib, **CALIB))
    assert r["param_overhead"] == 0 and r["expand_budget"]["chosen"] == {} and r["expand_budget"]["added_params"] == 0
    assert all(s["size"] == s["in_features"] for s in r["online"].values())


def test_quantized_budget_keeps_groups_whole(tmp_path, tiny, monkeypatch):
    src, calib = tiny
    from vllm_qexpand.converters import budget

    real = budget.check_end_to_end
    monkeypatch.setattr(budget, "check_end_to_end", lambda state, plans: {**real(state, plans), "kept": True})
    r = convert(src, tmp_path / "q", Options(scheme="w4a16", group_size=32, expand_budget=0.05, calib=calib, **CALIB))
    eb = r["expand_budget"]
    assert r["param_overhead"] <= 0.05 and eb["chosen"]
    for name, c in eb["chosen"].items():
        assert c["size"] % 32 == 0
    ids = torch.randint(0, 300, (2, 24))
    ref = _logits(src, ids)
    assert ((_logits(tmp_path / "q", ids) - ref).norm() / ref.norm()) < 0.3


def _heldout_nll(src, path, calib) -> float:
    """The reference's mean next-token loss of checkpoint `path` on the held-out windows (after the calibration ones)."""
    from transformers import AutoTokenizer

    from vllm_qexpand.converters import heldout

    ids = AutoTokenizer.from_pretrained(src)(calib.read_text())["input_ids"]
    n, length = CALIB["calib_samples"], CALIB["calib_len"]
    held = torch.tensor(ids[n * length:(n + heldout.WINDOWS) * length]).reshape(-1, length)
    with torch.no_grad():
        logits = load_model(path)(held).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1)).item()


def test_end_to_end_check_is_the_quantized_models_loss(tmp_path, tiny):
    """The check's loss of the unexpanded plan is the held-out loss of the RTN checkpoint without expansion, as
    the torch reference scores it (same windows: the ones after the calibration windows)."""
    from vllm_qexpand.converters import heldout

    src, calib = tiny
    opts = dict(scheme="w4a4", act_clip=0.8, dtype="float32", calib=calib, **CALIB)
    r = convert(src, tmp_path / "b", Options(expand_budget=0.05, **opts))
    check = r["expand_budget"]["check"]
    assert check["windows"] == heldout.WINDOWS and set(check["nll"]) == {"unexpanded", "chosen"}
    assert check["kept"] == (check["nll"]["chosen"] < check["nll"]["unexpanded"])
    assert check["kept"] == bool(r["expand_budget"]["chosen"]) == (r["param_overhead"] > 0)
    convert(src, tmp_path / "plain", Options(**opts))  # the same recipe, nothing expanded
    ref = _heldout_nll(src, tmp_path / "plain", calib)
    # fake-quantized float GEMM vs the reference's integer-exact one: a rounding-level difference (measured 1e-7)
    assert abs(check["nll"]["unexpanded"] - ref) <= 1e-5 * ref, (check["nll"], ref)


def test_r1_candidates_keep_the_draw_with_the_lowest_heldout_loss(tmp_path, tiny):
    src, calib = tiny
    opts = dict(scheme="w4a4", dtype="float32", calib=calib, **CALIB)
    r = convert(src, tmp_path / "c", Options(r1_candidates=3, seed=5, **opts))
    rc = r["r1_candidates"]
    losses = {int(s): v for s, v in rc["losses"].items()}
    assert sorted(losses) == [5, 6, 7] and rc["chosen"] == min(losses, key=losses.get)
    assert len(set(losses.values())) == 3  # the draws really differ
    assert r["r1"]["seed"] == rc["chosen"] and r["r1"]["candidates"] == 3 and "best of 3" in r["recipe"]
    # the checkpoint is the chosen draw's, and its loss is the one the choice measured
    convert(src, tmp_path / "s", Options(seed=rc["chosen"], **opts))
    shards = lambda p: {f.name: f.read_bytes() for f in p.glob("*.safetensors")}  # noqa: E731
    assert shards(tmp_path / "c") == shards(tmp_path / "s")
    assert abs(losses[rc["chosen"]] - _heldout_nll(src, tmp_path / "c", calib)) <= 1e-5 * losses[rc["chosen"]]
    for bad, match in ((dict(r1=False), "--no-r1"), (dict(scheme="none"), "--no-quant"),
                       (dict(r1_candidates=0), "must be a count")):
        with pytest.raises(ConvertError, match=match):
            convert(src, tmp_path / "x", Options(**{**opts, "r1_candidates": 2, **bad}))
    with pytest.raises(ConvertError, match="--r1-candidates needs a calibration text"):
        convert(src, tmp_path / "x", Options(scheme="w4a4", r1_candidates=2, progress=False))
    assert not (tmp_path / "x").exists()
    from vllm_qexpand import cli

    assert cli.options_from_args(cli.build_parser().parse_args(["convert", "s", "d", "--r1-candidates", "8"])).r1_candidates == 8


def test_budget_converts_unexpanded_when_expansion_does_not_pay(tmp_path, tiny, monkeypatch):
    from vllm_qexpand.converters import budget

    src, calib = tiny
    seen = []

    def worse(state, plans):
        seen.append({k: {n: s.size for n, s in p.items()} for k, p in plans.items()})
        return {"windows": 4, "tokens": 256, "nll": {"unexpanded": 5.0, "chosen": 5.1}, "kept": False}

    monkeypatch.setattr(budget, "check_end_to_end", worse)
    r = convert(src, tmp_path / "n", Options(scheme="w4a4", expand_budget=0.05, calib=calib, **CALIB))
    assert seen and seen[0]["chosen"] != seen[0]["unexpanded"]  # the greedy had chosen an expansion
    eb = r["expand_budget"]
    assert eb["chosen"] == {} and eb["added_params"] == 0 and r["param_overhead"] == 0 and not eb["check"]["kept"]
    assert all(s["size"] == s["in_features"] for s in r["online"].values())
    assert any("did not lower the held-out loss" in note for note in r["notes"])


def test_budget_option_errors(tmp_path, tiny):
    src, calib = tiny
    with pytest.raises(ConvertError, match="--expand-budget and --expand exclude each other"):
        convert(src, tmp_path / "x", Options(expand=[("down_proj", 1)], expand_budget=0.05, calib=calib, **CALIB))
    with pytest.raises(ConvertError, match="--expand-budget needs a calibration text"):
        convert(src, tmp_path / "x", Options(expand_budget=0.05, progress=False))
    with pytest.raises(ConvertError, match="must be a fraction >= 0"):
        convert(src, tmp_path / "x", Options(expand_budget=-0.1, calib=calib, **CALIB))
    assert not (tmp_path / "x").exists()
    r = subprocess.run([sys.executable, "-m", "vllm_qexpand.cli", "convert", str(src), str(tmp_path / "x"),
                        "--expand", "down_proj=1", "--expand-budget", "0.05", "--calib", str(calib), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "exclude each other" in r.stderr and "Traceback" not in r.stderr
