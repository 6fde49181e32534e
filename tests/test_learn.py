"""--learn-rotation (converters/learn.py): Cayley SGD keeps R1 orthogonal, lowers its own loss, is
deterministic, preserves the function when written unquantized, composes with the other options."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tiny import TEXT, make_tiny_llama
from vllm_qexpand.converters import learn, load, pipeline
from vllm_qexpand.converters.pipeline import convert
from vllm_qexpand.converters.state import ConvertError, ModelState, Options
from vllm_qexpand.eval.perplexity import perplexity
from vllm_qexpand.eval.reference import load_model

LEARN = dict(learn_rotation=True, learn_steps=6, learn_batch=2, calib_len=64, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", hidden=64, intermediate=192, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT * 8)
    return path


@pytest.fixture(scope="module")
def learned(tmp_path_factory, small, calib):
    """A w4a4 conversion with a learned R1 (seeded Hadamard start) and its report."""
    dst = tmp_path_factory.mktemp("learned") / "q"
    report = convert(small, dst, Options(seed=3, calib=calib, **LEARN))
    return dst, report


def _r1(dst):
    with safe_open(dst / learn.ROTATION_FILE, framework="pt") as f:
        return f.get_tensor("r1")


def _digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "qexpand_report.json"}


def _state(src, **opts):
    """A ModelState after the setup passes before learn (R1 = the converter's seeded Hadamard)."""
    state = ModelState(src=src, config=load.read_config(src), options=Options(**opts))
    for name, fn in pipeline.SETUP_PASSES:
        if name == "learn":
            return state
        fn(state)


def test_learned_r1_is_orthogonal_and_reported(learned):
    dst, report = learned
    r1 = _r1(dst)
    assert r1.dtype == torch.float64 and r1.shape == (64, 64)
    assert (r1.t() @ r1 - torch.eye(64, dtype=torch.float64)).abs().max() <= 1e-5
    lr = report["learn_rotation"]
    assert report["r1"]["kind"] == "learned" and report["r1"]["init"]["seed"] == 3
    assert lr["steps"] == 6 and len(lr["losses"]) == 6 and lr["orthogonality_error"] <= 1e-5
    assert "learned R1 (6 Cayley SGD steps" in report["recipe"]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["r1"]["kind"] == "learned"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from vllm_qexpand.fetch import fetch_smollm2

    return fetch_smollm2(tmp_path_factory.mktemp("smollm2") / "src")


def test_learning_lowers_its_own_loss(tmp_path, smollm2):
    """On the real SmolLM2-135M (a random tiny model has no structure for a rotation to learn), a few full-batch
    steps on three windows lower the W4A4 loop's loss on those windows below the seeded Hadamard's."""
    from vllm_qexpand.eval.data import calibration_text

    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text()[:2000])
    opts = dict(LEARN, calib=calib, calib_len=128, learn_batch=3, learn_steps=4, seed=0)
    state = _state(smollm2, **opts)
    h0 = pipeline.rotate._times_r1(state, torch.eye(state.hidden, dtype=torch.float64))
    windows, distinct = learn._windows(state, 3)
    assert distinct == 3  # every step sees the same three windows
    learn.setup(state)
    x = state.r1_matrix
    assert (x.t() @ x - torch.eye(state.hidden, dtype=torch.float64)).abs().max() <= 1e-5
    model = learn.LoopModel(state)
    with torch.no_grad():
        model.refresh_clip(h0)
        before = model.loss(h0.float(), windows).item()
        model.refresh_clip(x)
        after = model.loss(x.float(), windows).item()
    assert after < before - 0.05, (before, after)
    assert state.report["learn_rotation"]["losses"][0] == pytest.approx(before, abs=1e-3)


def test_same_seed_same_checkpoint(tmp_path, learned, small, calib):
    dst, _ = learned
    again = tmp_path / "again"
    convert(small, again, Options(seed=3, calib=calib, **LEARN))
    assert _digest(again) == _digest(dst)
    other = tmp_path / "other"
    convert(small, other, Options(seed=4, calib=calib, **LEARN))
    assert not torch.equal(_r1(other), _r1(dst))


def test_unquantized_with_learned_r1_preserves_function(tmp_path, learned, small):
    """--rotation FILE with --no-quant: the fused learned R1 leaves logits and perplexity as the source's."""
    dst, _ = learned
    out = tmp_path / "float"
    report = convert(small, out, Options(scheme="none", rotation=dst / learn.ROTATION_FILE, progress=False))
    assert report["r1"] == {"kind": "learned", "size": 64, "file": str(dst / learn.ROTATION_FILE)}
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = load_model(small), load_model(out)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert (la - lb).abs().max() / la.abs().max() <= 1e-4
    tokens = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    pa = perplexity(a, tokens, window=64, progress=False)["ppl"]
    pb = perplexity(b, tokens, window=64, progress=False)["ppl"]
    assert abs(pa - pb) / pa <= 1e-5, (pa, pb)
    # and the learned R1 is really fused: the rotated weights differ from a plain-Hadamard conversion's
    plain = tmp_path / "plain"
    convert(small, plain, Options(scheme="none", progress=False))
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(out / "model-00002-of-00004.safetensors", framework="pt") as f, \
         safe_open(plain / "model-00002-of-00004.safetensors", framework="pt") as g:
        assert not torch.allclose(f.get_tensor(name), g.get_tensor(name), atol=1e-3)


@pytest.mark.parametrize("opts", [
    dict(scheme="w4a8", expand=[("down_proj", 1)], tp_blocks=2),
    dict(scheme="w4a16", group_size=8, online=("down_proj", "o_proj"), expand=[("o_proj", 1)]),
    dict(scheme="w4a4", gptq=True, calib_samples=2, learn_weights="float"),
], ids=["w4a8-expand-tp2", "w4a16-g8-online-o", "w4a4-gptq-float-weights-in-loop"])
def test_composes_with_schemes_expansion_tp_blocks_and_gptq(tmp_path, small, calib, opts):
    dst = tmp_path / "q"
    report = convert(small, dst, Options(calib=calib, **{**LEARN, "learn_steps": 2}, **opts))
    assert report["r1"]["kind"] == "learned" and report["learn_rotation"]["orthogonality_error"] <= 1e-5
    assert report["learn_rotation"]["weights_in_loop"] == opts.get("learn_weights", "rtn")
    model = load_model(dst)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 16))).logits).all()
    # --rotation FILE reproduces the same checkpoint without learning again
    again = tmp_path / "again"
    report2 = convert(small, again, Options(calib=calib, rotation=dst / learn.ROTATION_FILE,
                                            **{k: v for k, v in {**LEARN, **opts}.items() if not k.startswith("learn")}))
    assert "learn_rotation" not in report2
    a, b = _digest(dst), _digest(again)
    assert {k: v for k, v in a.items() if k != "config.json"} == {k: v for k, v in b.items() if k != "config.json"}


def test_checkpointing_gives_the_same_loss_and_gradient_and_is_chosen_when_memory_is_short(tmp_path, small, calib,
                                                                                          monkeypatch):
    state = _state(small, seed=3, calib=calib, **LEARN)
    windows, _ = learn._windows(state, 2)
    r1 = pipeline.rotate._times_r1(state, torch.eye(64, dtype=torch.float64)).float()
    results = []
    for checkpoint in (False, True):
        r = r1.clone().requires_grad_(True)
        loss = learn.LoopModel(state, checkpoint).loss(r, windows)
        loss.backward()
        results.append((loss.detach(), r.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
    plain, ckpt = learn.memory_estimate(state), learn.memory_estimate(state, checkpoint=True)
    assert ckpt < plain
    monkeypatch.setattr(learn, "_available_memory", lambda: (plain + ckpt) // 2)
    report = convert(small, tmp_path / "c", Options(seed=3, calib=calib, **LEARN))
    assert report["learn_rotation"]["activation_checkpointing"] and "activation checkpointing" in report["notes"][-1]


def test_bad_options_and_files_are_refused(tmp_path, small, calib, monkeypatch):
    with pytest.raises(ConvertError, match="--no-quant has none"):
        convert(small, tmp_path / "a", Options(scheme="none", calib=calib, **LEARN))
    with pytest.raises(ConvertError, match="--no-r1 exclude"):
        convert(small, tmp_path / "a", Options(r1=False, calib=calib, **LEARN))
    with pytest.raises(ConvertError, match="--learn-weights 'int8'"):
        convert(small, tmp_path / "a", Options(calib=calib, **LEARN, learn_weights="int8"))
    with pytest.raises(ConvertError, match="needs a calibration text"):
        convert(small, tmp_path / "a", Options(**LEARN))
    bad = tmp_path / "bad.safetensors"
    save_file({"r1": torch.eye(32, dtype=torch.float64)}, str(bad))
    with pytest.raises(ConvertError, match=r"R1 is \(32, 32\), the model's hidden size is 64"):
        convert(small, tmp_path / "a", Options(rotation=bad, progress=False))
    save_file({"r1": torch.eye(64, dtype=torch.float64) * 1.01}, str(bad))
    with pytest.raises(ConvertError, match="not orthogonal"):
        convert(small, tmp_path / "a", Options(rotation=bad, progress=False))
    with pytest.raises(ConvertError, match="not a rotation file"):
        convert(small, tmp_path / "a", Options(rotation=tmp_path / "missing.safetensors", progress=False))
    with pytest.raises(ConvertError, match="exclude each other"):
        convert(small, tmp_path / "a", Options(rotation=bad, calib=calib, **LEARN))
    monkeypatch.setattr(learn, "_available_memory", lambda: 1 << 20)
    with pytest.raises(ConvertError, match=r"needs about .* GiB .* lower --learn-batch"):
        convert(small, tmp_path / "a", Options(calib=calib, **LEARN))
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))


def test_cli_flags_reach_the_options(small):
    from vllm_qexpand import cli

    args = cli.build_parser().parse_args(["convert", "s", "d", "--learn-rotation", "--learn-steps", "7",
                                          "--learn-lr", "0.5", "--learn-batch", "3", "--rtn", "--learn-weights", "float"])
    o = cli.options_from_args(args)
    assert o.learn_rotation and (o.learn_steps, o.learn_lr, o.learn_batch) == (7, 0.5, 3) and not o.gptq
    assert o.learn_weights == "float"
    o = cli.options_from_args(cli.build_parser().parse_args(["convert", "s", "d", "--rotation", "r.safetensors"]))
    assert str(o.rotation) == "r.safetensors" and not o.learn_rotation
