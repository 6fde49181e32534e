"""Bad qexpand checkpoints fail before anything is served, naming the offending field/file/tensor.

No engine is started here: QExpandConfig.from_config rejects bad configs, and the
pre-flight check (QExpandConfig.maybe_update_config, run by vLLM in the API process while
it builds its config) rejects bad checkpoint files before any engine process is spawned.
The worker-side checks (tensors vLLM would leave uninitialised) are in test_plugin_loader.py.
"""
import copy
import os
import pickle
import socket
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from vllm_qexpand.format import FormatError  # noqa: E402
from vllm_qexpand.plugin import register  # noqa: E402

register()
from vllm_qexpand.plugin.config import QExpandConfig  # noqa: E402

GOOD = {
    "quant_method": "qexpand",
    "format_version": 1,
    "scheme": "w4a4",
    "weights": {"bits": 4, "symmetric": True, "group_size": 0, "packing": "int32-offset8", "clip": "mse"},
    "activations": {"bits": 4, "symmetric": True, "dynamic": True, "granularity": "per_token"},
    "online": {"model.layers.0.mlp.down_proj": {"in_features": 320, "size": 384, "k": 12}},
    "ignore": ["lm_head"],
}
KINDS = ["truncated", "scale_shape", "missing", "packed_dtype"]


def _with(path, value):
    qc = copy.deepcopy(GOOD)
    d = qc
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    return qc


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("scheme",), "w3a3", "scheme"),
        (("format_version",), 3, "format_version"),
        (("format_version",), True, "format_version"),
        (("activations", "clip"), 0.8, "activations.clip needs format_version 2"),
        (("weights", "bits"), 8, "weights.bits"),
        (("activations", "bits"), 8, "activations.bits"),
        (("activations", "granularity"), "per_tensor", "activations.granularity"),
        (("online",), {"model.layers.0.mlp.down_proj": {"in_features": 320, "size": 330, "k": 12}}, "online"),
    ],
)
def test_config_rejects_unknown_fields(path, value, field):
    with pytest.raises(FormatError, match=field.replace(".", r"\.")):
        QExpandConfig.from_config(_with(path, value))


@pytest.mark.parametrize("clip", [0, 1.5, -0.5, "0.8", True, None])
def test_config_rejects_a_bad_activation_clip(clip):
    qc = _with(("activations", "clip"), clip)
    qc["format_version"] = 2
    with pytest.raises(FormatError, match=r"activations\.clip"):
        QExpandConfig.from_config(qc)


def test_config_reads_the_activation_clip_of_version_2():
    assert QExpandConfig.from_config(GOOD).act_clip == 1.0  # version 1: no clip
    qc = _with(("activations", "clip"), 0.8)
    qc["format_version"] = 2
    assert QExpandConfig.from_config(qc).act_clip == 0.8
    del qc["activations"]["clip"]
    assert QExpandConfig.from_config(qc).act_clip == 1.0


def test_config_is_plain_picklable_and_claims_only_qexpand():
    cfg = QExpandConfig.from_config(GOOD)
    back = pickle.loads(pickle.dumps(cfg))
    assert (back.scheme, back.act_bits, back.online) == ("w4a4", 4, {"model.layers.0.mlp.down_proj": (320, 384, 12, 1)})
    assert QExpandConfig.override_quantization_method(GOOD, None) == "qexpand"
    assert QExpandConfig.override_quantization_method({"quant_method": "QExpand"}, "qexpand") == "qexpand"
    assert QExpandConfig.override_quantization_method({"quant_method": "gptq", "bits": 4}, None) is None
    import torch

    assert torch.float32 in cfg.get_supported_act_dtypes() and torch.bfloat16 in cfg.get_supported_act_dtypes()


@pytest.fixture(scope="module")
def bad_dirs(serve_models, break_checkpoint, tmp_path_factory):
    good = serve_models("w4a4-exp", scheme="w4a4", online=("down_proj", "o_proj"), expand=[("down_proj", 1)])
    root = tmp_path_factory.mktemp("bad")
    return good, {k: break_checkpoint(good, root / k, k) for k in KINDS}


def test_preflight_accepts_good_checkpoint(bad_dirs):
    good, _ = bad_dirs
    QExpandConfig.from_config(_raw_qc(good)).maybe_update_config(str(good))


@pytest.mark.parametrize("kind", KINDS)
def test_preflight_names_the_culprit(bad_dirs, kind):
    good, bad = bad_dirs
    path, culprit = bad[kind]
    with pytest.raises(FormatError, match=culprit.replace(".", r"\.")):
        QExpandConfig.from_config(_raw_qc(path)).maybe_update_config(str(path))


@pytest.mark.parametrize("kind", ["scale_shape", "missing", "truncated"])
def test_llm_refuses_before_starting_an_engine(bad_dirs, kind):
    """vLLM's own config building runs the pre-flight: LLM(...) raises, naming the tensor/file."""
    from vllm import LLM

    path, culprit = bad_dirs[1][kind]
    with pytest.raises(Exception, match=culprit.replace(".", r"\.")):
        LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=16 << 20)


def test_server_refuses_and_serves_nothing(bad_dirs, tmp_path):
    path, culprit = bad_dirs[1]["missing"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_qexpand.serve", str(path), "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--enforce-eager", "--max-model-len", "128"],
            stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert culprit in text, text[-3000:]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listening


def _raw_qc(path):
    import json

    return json.loads((path / "config.json").read_text())["quantization_config"]
