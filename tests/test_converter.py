"""Converter: function preservation, format, determinism, safety, errors (tiny random models)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tiny import make_tiny_llama
from vllm_qexpand.converters.pipeline import convert
from vllm_qexpand.converters.state import ConvertError, Options
from vllm_qexpand.eval.reference import load_model

SHAPES = {
    "small": dict(hidden=64, intermediate=192, heads=4, kv_heads=2),
    "smollm-like": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=1, tie=True),
    "qwen2-bias": dict(hidden=128, intermediate=320, heads=4, kv_heads=4, arch="qwen2"),
    "no-hadamard-r1": dict(hidden=88, intermediate=192, heads=4, kv_heads=2),  # 88 = 11·8, head_dim 22
}


def _logits(path, ids):
    with torch.no_grad():
        return load_model(path)(ids).logits


def _digest(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", **SHAPES["small"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("online,expand", [(("down_proj",), [("down_proj", 1)]), (("down_proj", "o_proj"), [("down_proj", 3), ("o_proj", 1)])])
def test_no_quant_preserves_function(tmp_path, shape, online, expand):
    src = make_tiny_llama(tmp_path / "src", **SHAPES[shape])
    if shape == "no-hadamard-r1":
        online, expand = ("down_proj",), [("down_proj", 1)]  # o_proj width 88 has no Hadamard
    report = convert(src, tmp_path / "dst", Options(scheme="none", online=online, expand=expand, seed=1, progress=False))
    assert any(s["size"] > s["in_features"] for s in report["online"].values())
    if shape == "no-hadamard-r1":
        assert report["r1"]["kind"] == "random_orthogonal" and report["notes"]
    ids = torch.randint(0, 300, (2, 24))
    a, b = _logits(src, ids), _logits(tmp_path / "dst", ids)
    rel = (a - b).abs().max() / a.abs().max()
    assert rel <= 1e-4, rel


def test_expanded_tensor_shapes_and_config(tmp_path, small):
    dst = tmp_path / "q"
    convert(small, dst, Options(scheme="w4a4", expand=[("down_proj", 1)], progress=False))
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "qexpand" and qc["format_version"] == 2 and qc["scheme"] == "w4a4"
    assert qc["online"]["model.layers.1.mlp.down_proj"] == {"in_features": 192, "size": 208, "k": 52, "blocks": 1}
    from vllm_qexpand.converters.quantize import ACT_CLIP_DEFAULT  # w4a4's default --act-clip: version 2
    assert qc["activations"] == {"bits": 4, "symmetric": True, "dynamic": True, "granularity": "per_token",
                                 "clip": ACT_CLIP_DEFAULT["w4a4"]} and ACT_CLIP_DEFAULT["w4a4"] < 1
    assert cfg["tie_word_embeddings"] is False
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(dst / index["model.layers.0.mlp.down_proj.weight_packed"], framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_packed").shape == (64, 208 // 8)
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_packed").dtype == torch.int32
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").shape == (64, 1)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed").shape == (64, 8)
        assert torch.equal(f.get_tensor("model.layers.0.input_layernorm.weight"), torch.ones(64))
        assert "model.layers.0.mlp.down_proj.weight" not in f.keys()
    assert {"tokenizer.json", "qexpand_report.json"} <= {p.name for p in dst.iterdir()}
    report = json.loads((dst / "qexpand_report.json").read_text())
    assert len(report["layers"]) == 14 and 0 < report["param_overhead"] < 0.1


def test_quantized_model_is_close_and_expansion_changes_weights(tmp_path, small):
    ids = torch.randint(0, 300, (2, 24))
    ref = _logits(small, ids)
    errs = {}
    for name, opts in {"w4a16": Options(scheme="w4a16", group_size=64), "w4a8": Options(scheme="w4a8"),
                       "w4a4": Options(scheme="w4a4")}.items():
        opts.progress = False
        convert(small, tmp_path / name, opts)
        errs[name] = ((_logits(tmp_path / name, ids) - ref).norm() / ref.norm()).item()
    assert errs["w4a16"] < 0.3 and errs["w4a8"] < 0.3 and errs["w4a4"] < 0.5, errs
    assert errs["w4a4"] > errs["w4a8"]  # 4-bit activations cost more than 8-bit


def test_deterministic_output(tmp_path, small):
    opts = dict(scheme="w4a4", expand=[("down_proj", 1)], seed=7, progress=False)
    convert(small, tmp_path / "a", Options(**opts))
    convert(small, tmp_path / "b", Options(**opts))
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da.pop("qexpand_report.json") and db.pop("qexpand_report.json")  # holds timings
    assert da == db
    ra, rb = (json.loads((tmp_path / d / "qexpand_report.json").read_text()) for d in "ab")
    ra.pop("timing"), rb.pop("timing")
    assert ra == rb
    convert(small, tmp_path / "c", Options(**{**opts, "seed": 8}))
    assert _digest(tmp_path / "c")["model-00002-of-00004.safetensors"] != da["model-00002-of-00004.safetensors"]


def test_source_untouched_and_dst_refused(tmp_path, small):
    before = _digest(small)
    dst = tmp_path / "q"
    convert(small, dst, Options(progress=False))
    assert _digest(small) == before
    with pytest.raises(ConvertError, match="exists"):
        convert(small, dst, Options(progress=False))
    convert(small, dst, Options(progress=False, force=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_mse_clip_lowers_weight_error(tmp_path, small):
    r_none = convert(small, tmp_path / "n", Options(clip="none", progress=False))
    r_mse = convert(small, tmp_path / "m", Options(clip="mse", progress=False))
    e = lambda r: sum(l["rel_weight_error"] for l in r["layers"])  # noqa: E731
    assert e(r_mse) < e(r_none)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vllm_qexpand.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_errors_are_clear(tmp_path, small):
    r = _cli("convert", tmp_path / "nope", tmp_path / "out")
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr

    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    r = _cli("convert", gpt, tmp_path / "out")
    assert r.returncode == 2 and "GPT2LMHeadModel is not supported" in r.stderr

    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in small.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = _cli("convert", bad, tmp_path / "out")
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "truncated" in r.stderr

    (tmp_path / "exists").mkdir()
    r = _cli("convert", small, tmp_path / "exists")
    assert r.returncode == 2 and "--force" in r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused(tmp_path, small):
    with pytest.raises(ConvertError, match="o_proj"):
        convert(small, tmp_path / "x", Options(expand=[("o_proj", 1)], progress=False))
    with pytest.raises(ConvertError, match="group-size"):
        convert(small, tmp_path / "x", Options(scheme="w4a16", group_size=128, progress=False))
    with pytest.raises(ConvertError, match=r"not K·2\^p"):
        convert(small, tmp_path / "x", Options(expand=[("down_proj", 200)], progress=False))
    assert not (tmp_path / "x").exists()


def test_act_clip_is_declared_and_used(tmp_path, small):
    """--act-clip C writes activations.clip (format version 2), changes no weight, and the reference uses it."""
    from vllm_qexpand import cli

    convert(small, tmp_path / "c1", Options(scheme="w4a4", act_clip=1.0, progress=False))
    report = convert(small, tmp_path / "c7", Options(scheme="w4a4", act_clip=0.7, progress=False))
    q1 = json.loads((tmp_path / "c1" / "config.json").read_text())["quantization_config"]
    q7 = json.loads((tmp_path / "c7" / "config.json").read_text())["quantization_config"]
    assert q1["format_version"] == 1 and "clip" not in q1["activations"]  # no clip: still readable by version-1 readers
    assert q7["format_version"] == 2 and q7["activations"]["clip"] == 0.7
    assert "activation clip 0.7" in report["recipe"]
    shards = {k: v for k, v in _digest(tmp_path / "c1").items() if k.endswith(".safetensors")}
    assert shards and shards == {k: v for k, v in _digest(tmp_path / "c7").items() if k.endswith(".safetensors")}
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(_logits(tmp_path / "c1", ids), _logits(tmp_path / "c7", ids))
    for opts, match in ((dict(scheme="w4a16", act_clip=0.7), "does not quantize activations"),
                        (dict(act_clip=0.0), r"\(0, 1\]"), (dict(act_clip=1.2), r"\(0, 1\]")):
        with pytest.raises(ConvertError, match=match):
            convert(small, tmp_path / "x", Options(progress=False, **opts))
    assert not (tmp_path / "x").exists()
    assert cli.options_from_args(cli.build_parser().parse_args(["convert", "s", "d", "--act-clip", "0.6"])).act_clip == 0.6


def test_cli_convert_and_eval(tmp_path, small):
    r = _cli("convert", small, tmp_path / "q", "--expand", "layers\\.0\\.mlp\\.down_proj=2", "--rtn", "--quiet")
    assert r.returncode == 0, r.stderr
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["online"]["model.layers.0.mlp.down_proj"]["size"] > 192
    assert qc["online"]["model.layers.1.mlp.down_proj"]["size"] == 192
    text = tmp_path / "t.txt"
    from tiny import TEXT
    text.write_text(TEXT * 3)
    r = _cli("eval", tmp_path / "q", "--text", text, "--window", "64", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["ppl"] > 1 and res["tokens"] > 0


@pytest.mark.parametrize("blocks", [2, 4])
def test_tp_blocks_preserve_function_and_split_per_block(tmp_path, small, blocks):
    report = convert(small, tmp_path / "b", Options(scheme="none", online=("down_proj", "o_proj"), tp_blocks=blocks,
                                                    expand=[("down_proj", 1)], progress=False))
    spec = report["online"]["model.layers.0.mlp.down_proj"]
    assert spec["blocks"] == blocks and spec["size"] > 192 and spec["size"] % blocks == 0
    from vllm_qexpand.hadamard import next_size
    assert spec["size"] == blocks * next_size(192 // blocks, 1, multiple=8)  # the size rule applies per block
    ids = torch.randint(0, 300, (2, 24))
    a, b = _logits(small, ids), _logits(tmp_path / "b", ids)
    assert (a - b).abs().max() / a.abs().max() <= 1e-4


def test_tp_blocks_refused_when_block_has_no_hadamard(tmp_path, small):
    with pytest.raises(ConvertError, match="tp-blocks"):
        convert(small, tmp_path / "x", Options(tp_blocks=3, progress=False))
    with pytest.raises(ConvertError, match="multiple of 8"):
        convert(small, tmp_path / "x", Options(tp_blocks=32, progress=False))


def test_no_rotation_baseline_only_folds_norms(tmp_path, small):
    report = convert(small, tmp_path / "plain", Options(scheme="none", r1=False, r2=False, online=(), progress=False))
    assert report["r1"] is None and report["online"] == {}
    ids = torch.randint(0, 300, (2, 24))
    a, b = _logits(small, ids), _logits(tmp_path / "plain", ids)
    assert (a - b).abs().max() / a.abs().max() <= 1e-5
    with safe_open(small / "model.safetensors", framework="pt") as f, \
         safe_open(tmp_path / "plain" / "model-00002-of-00004.safetensors", framework="pt") as g:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert torch.equal(g.get_tensor("model.layers.0.mlp.down_proj.weight"), w)  # no norm feeds down_proj


@pytest.mark.parametrize("opts", [dict(), dict(gptq=True, sequential=True)], ids=["rtn", "gptq-sequential"])
def test_same_bytes_at_one_and_two_threads(tmp_path, small, opts):
    """A conversion does not depend on the thread count (torch's CPU reductions split differently)."""
    from tiny import TEXT
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 8)
    if opts:
        opts = dict(opts, calib=calib, calib_samples=4, calib_len=64)
    saved = torch.get_num_threads()
    try:
        digests = []
        for n in (1, 2):
            torch.set_num_threads(n)
            convert(small, tmp_path / f"t{n}", Options(progress=False, **opts))
            digests.append({k: v for k, v in _digest(tmp_path / f"t{n}").items() if k != "qexpand_report.json"})
    finally:
        torch.set_num_threads(saved)
    assert digests[0] == digests[1]


def test_default_recipe_is_what_help_says(tmp_path, small, monkeypatch, capsys):
    """`qexpand convert SRC DST` with no flags runs the recipe --help names: GPTQ on the built-in text."""
    from tiny import TEXT
    from vllm_qexpand import cli
    from vllm_qexpand.converters import calibrate

    help_text = cli.build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    flat = " ".join(help_text.split())
    assert "Default recipe:" in flat and "GPTQ" in flat and "--rtn" in flat
    args = cli.build_parser().parse_args(["convert", "src", "dst"])
    o = cli.options_from_args(args)
    assert o.gptq and o.calib is None and o.calib_builtin and o.clip == "mse" and o.scheme == "w4a4"
    from vllm_qexpand.converters.quantize import ACT_CLIP_DEFAULT, act_clip_of
    assert act_clip_of(o) == ACT_CLIP_DEFAULT["w4a4"] and f"w4a4 {ACT_CLIP_DEFAULT['w4a4']:g}" in flat
    assert f"activation clip {ACT_CLIP_DEFAULT['w4a4']:g}" in flat
    assert o.sequential == cli.DEFAULT_SEQUENTIAL and ("sequential inside each layer" in flat) == o.sequential
    assert o.calib_samples == cli.DEFAULT_CALIB_SAMPLES and f"({o.calib_samples} windows of 512 tokens)" in flat
    fast = cli.options_from_args(cli.build_parser().parse_args(["convert", "src", "dst", "--rtn"]))
    assert not fast.gptq
    # run it: the built-in text (stubbed here: no download in tests) is what calibrates, and the report says so
    builtin = tmp_path / "calibration-books.txt"
    builtin.write_text(TEXT * 40)
    monkeypatch.setattr(calibrate, "builtin_calibration_file", lambda: builtin)
    assert cli.main(["convert", str(small), str(tmp_path / "d"), "--calib-len", "64", "--quiet"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "d" / "qexpand_report.json").read_text())
    assert "GPTQ" in report["recipe"] and "built-in text" in report["recipe"] and report["recipe"] in out
    assert report["calibration"]["text"] == calibrate.BUILTIN_CALIB
    assert cli.main(["convert", str(small), str(tmp_path / "f"), "--rtn", "--quiet"]) == 0
    assert "data-free" in json.loads((tmp_path / "f" / "qexpand_report.json").read_text())["recipe"]
