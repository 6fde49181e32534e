"""benchmarks/peers.py pieces that need neither Brevitas nor a model: flags, row merging, the table."""

import pytest

from vllm_qexpand.cli import build_parser, options_from_args


@pytest.fixture(scope="module")
def peers(benchmark):
    return benchmark("peers")


@pytest.mark.parametrize("seed", [None, 2])
def test_flags_give_the_options_measured(peers, seed):
    """The `qexpand convert` flags shown for a row give the options peers.py converts with."""
    for config in peers.CONFIGS:
        for layout in peers.LAYOUTS:
            flags = peers.qexpand_flags(config, layout, seed)
            got = options_from_args(build_parser().parse_args(["convert", "src", "dst", *flags]))
            want = peers.qexpand_options(config, layout)
            assert tuple(got.online) == tuple(want["online"]), (config, layout, flags)
            assert [tuple(e) for e in got.expand] == [tuple(e) for e in want.get("expand", [])], flags
            assert got.gptq == want["gptq"], flags
            assert got.seed == seed
            if want["gptq"]:
                assert got.sequential


def test_merge_rows_replaces_only_rerun_rows(peers):
    old = [dict(tool="qexpand", config="rotation", layout="r2", seed=None, ppl=1.0),
           dict(tool="brevitas", config="rotation", layout="r2", seed=None, ppl=2.0),
           dict(tool="qexpand", config="rotation", layout="r2", seed=0, ppl=3.0)]
    new = [dict(tool="qexpand", config="rotation", layout="r2", seed=None, ppl=9.0)]
    merged = peers.merge_rows(old, new)
    assert [r["ppl"] for r in merged] == [2.0, 3.0, 9.0]
    assert peers.merge_rows(merged, []) == merged


def test_table_puts_both_tools_side_by_side(peers):
    result = {"float_ppl": {"qexpand": 22.366, "brevitas": 22.366}, "rows": [
        dict(tool="brevitas", config="expand-s3", layout="quarot", seed=None, ppl=60.5, param_overhead=0.05, seconds=40),
        dict(tool="qexpand", config="rotation", layout="quarot", seed=None, ppl=130.2, param_overhead=0.0, seconds=12),
        dict(tool="brevitas", config="rotation", layout="quarot", seed=None, ppl=83.886, param_overhead=0.0, seconds=35),
        dict(tool="qexpand", config="rotation", layout="r2", seed=0, ppl=120.0, param_overhead=0.0, seconds=11),
    ]}
    lines = peers.markdown_table(result).splitlines()
    assert lines[0].startswith("| config | layout | R1 | qexpand PPL | Brevitas PPL")
    assert lines[2] == "| float | — | — | 22.366 | 22.366 | — | — | — | — |"
    body = lines[3:]
    # configs in CONFIGS order, layouts r2 before quarot, plain Hadamard before seeds
    assert body[0] == "| rotation | r2 | seed 0 | 120.00 | — | +0.0% | — | 11 | — |"
    assert body[1] == "| rotation | quarot | Hadamard | 130.20 | 83.89 | +0.0% | +0.0% | 12 | 35 |"
    assert body[2] == "| expand-s3 | quarot | Hadamard | — | 60.50 | — | +5.0% | — | 40 |"
    assert len(body) == 3


def test_brevitas_ab_rows_stay_apart(peers):
    """--brevitas-set rows neither replace nor sit in the side-by-side table; they get their own."""
    assert peers.parse_overrides(["input_narrow_range=true", "weight_bit_width=8", "weight_param_method=stats"]) == {
        "input_narrow_range": True, "weight_bit_width": 8, "weight_param_method": "stats"}
    with pytest.raises(SystemExit):
        peers.parse_overrides(["no-equals-sign"])
    recipe = dict(tool="brevitas", config="rotation", layout="r2", seed=None, ppl=72.343, param_overhead=0.0, seconds=33)
    ab = dict(recipe, ppl=86.302, overrides={"input_narrow_range": True})
    rows = peers.merge_rows([recipe], [ab])
    assert rows == [recipe, ab]
    lines = peers.markdown_table({"rows": rows}).splitlines()
    assert lines[2] == "| rotation | r2 | Hadamard | — | 72.34 | — | +0.0% | — | 33 |"
    assert lines[-1] == "| rotation | r2 | `input_narrow_range=True` | 86.30 | 72.34 |"


def test_mean_table_over_r1_draws(peers):
    """Ours averaged over R1 draws, with the share of the rotation-only gap each config closes, beside Brevitas."""
    def q(config, seed, ppl):
        return dict(tool="qexpand", config=config, layout="r2", seed=seed, ppl=ppl, param_overhead=0.0, seconds=1)
    result = {"float_ppl": {"qexpand": 20.0, "brevitas": 20.0}, "rows": [
        q("rotation", None, 100.0), q("rotation", 0, 80.0), q("expand-s1", None, 90.0), q("expand-s1", 0, 60.0),
        q("expand-s3", None, 70.0),  # one draw: not in the mean table
        dict(tool="brevitas", config="rotation", layout="r2", seed=None, ppl=70.0, param_overhead=0.0, seconds=1),
        dict(tool="brevitas", config="expand-s1", layout="r2", seed=None, ppl=60.0, param_overhead=0.016, seconds=1),
    ]}
    lines = peers.markdown_table(result).splitlines()
    start = lines.index(next(x for x in lines if x.startswith("| config | layout | qexpand R1 draws")))
    assert lines[start + 2] == "| rotation | r2 | 2 | 90.00 (80.00–100.00) | — | 70.00 | — |"
    # ours: (90 - 75) / (90 - 20) = 21.4%; Brevitas: (70 - 60) / (70 - 20) = 20.0%
    assert lines[start + 3] == "| expand-s1 | r2 | 2 | 75.00 (60.00–90.00) | +21.4% | 60.00 | +20.0% |"
    assert len(lines) == start + 4


def test_merge_results_of_runs_side_by_side(peers):
    a = {"model": "m", "float_ppl": {"qexpand": 22.4}, "rows": [dict(tool="qexpand", config="rotation", layout="r2", seed=None, ppl=1.0)]}
    b = {"model": "m", "float_ppl": {"brevitas": 22.4}, "rows": [dict(tool="brevitas", config="rotation", layout="r2", seed=None, ppl=2.0),
                                                                 dict(tool="qexpand", config="rotation", layout="r2", seed=None, ppl=3.0)]}
    m = peers.merge_results([a, b])
    assert m["model"] == "m" and m["float_ppl"] == {"qexpand": 22.4, "brevitas": 22.4}
    assert [(r["tool"], r["ppl"]) for r in m["rows"]] == [("brevitas", 2.0), ("qexpand", 3.0)]
