"""vLLM's default CPU compile mode (Dynamo trace-once, fullgraph, Inductor) on a w4a8 checkpoint:
one engine, float32, same logprobs and greedy text as the torch reference. vLLM compiles with
fullgraph=True, so a graph break in the plugin's apply() would fail the engine start.
"""
import pytest

pytest.importorskip("vllm")

from test_plugin_e2e import NEW_TOKENS, kernels_by_layer, make_prompts, reference_outputs, run_engine  # noqa: E402

pytestmark = pytest.mark.slow
OPTIONS = dict(scheme="w4a8", online=("down_proj", "o_proj"), expand=[("down_proj", 1)])


@pytest.fixture(scope="module")
def both(serve_models, tmp_path_factory):
    path = serve_models("w4a8-exp", **OPTIONS)
    trace = tmp_path_factory.mktemp("trace") / "trace.txt"
    got = run_engine(path, make_prompts(), NEW_TOKENS, trace)  # no enforce_eager: default compile mode
    return got, reference_outputs(path, make_prompts(), NEW_TOKENS)


def test_compiled_logprobs_match_reference(both):
    got, (ref_lps, _) = both
    for g, w in zip(got["logprobs"], ref_lps):
        assert (g - w).abs().mean() <= 1e-3, (g - w).abs().max()


def test_compiled_greedy_matches_reference(both):
    got, (_, ref_greedy) = both
    assert got["greedy"] == ref_greedy


def test_compiled_graph_calls_both_gemm_kernels(both):
    """The GEMM is an opaque custom op: inside the compiled graph it still picks int8 (prefill) or dense (decode)."""
    got, _ = both
    kernels = kernels_by_layer(got["trace"])
    assert len(kernels) == 8 and all(k == {"int8", "dense"} for k in kernels.values()), kernels
    assert not [ln for ln in got["trace"] if ln.startswith("apply ")]  # apply() itself was traced, not run eagerly
