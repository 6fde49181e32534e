"""benchmarks/accuracy.py pieces that need no model: the CLI flags shown for each config, the tables."""
from dataclasses import asdict

import pytest

from vllm_qexpand.cli import build_parser, options_from_args
from vllm_qexpand.converters.state import Options


@pytest.fixture(scope="module")
def acc(benchmark):
    return benchmark("accuracy")


def test_flags_convert_to_the_configs_options(acc):
    """The flags docs/accuracy.md shows for a row give `qexpand convert` the options that row was measured with."""
    default = asdict(Options())
    checked = 0
    for name, extra in acc.CONFIGS.items():
        if extra is None:
            continue
        args = build_parser().parse_args(["convert", "src", "dst", *acc.cli_flags(extra)])
        got = asdict(options_from_args(args))
        want = asdict(Options(**extra))
        got.pop("calib_builtin"), want.pop("calib_builtin")  # the benchmark passes the built-in text itself
        assert got == want, name
        assert extra == {} or got != default, name  # the flags change something
        checked += 1
    assert checked == len(acc.CONFIGS) - 1


def test_markdown_tables(acc):
    result = {"tasks": ["piqa", "lambada"], "rows": [
        {"config": "baseline", "scheme": None, "ppl": 20.0, "piqa": 0.7, "lambada": 0.3},
        {"config": "expand-s1", "scheme": "w4a4", "ppl": 60.0, "piqa": 0.55, "lambada": 0.05,
         "param_overhead": 0.016, "convert_s": 12.3},
        {"config": "rotation", "scheme": "w4a4", "ppl": 100.0, "piqa": 0.5, "lambada": 0.01,
         "param_overhead": 0.0, "convert_s": 9.0, "shared_cpu": True},
        {"config": "rotation", "scheme": "w4a16", "ppl": 30.0, "param_overhead": 0.0, "convert_s": 5.0},
    ]}
    text = acc.markdown_tables(result)
    w4a4, w4a16 = text.split("**w4a16**")
    lines = w4a4.strip().splitlines()
    assert lines[2].startswith("| config | `qexpand convert` flags | PPL | gap closed | PIQA | LAMBADA |")
    assert lines[4] == "| baseline (float) | — | 20.00 | — | 0.70 | 0.30 | — | — |"
    # rows in CONFIGS order (rotation before expand-s1), gap closed against rotation: (100 - 60) / (100 - 20)
    assert lines[5] == "| rotation | `--rtn` | 100.00 | 0.0% | 0.50 | 0.01 | +0.0% | 9 ‡ |"
    assert lines[6] == "| expand-s1 | `--rtn --expand down_proj=1` | 60.00 | 50.0% | 0.55 | 0.05 | +1.6% | 12 |"
    assert "| rotation | `--rtn` | 30.00 | 0.0% | — | — | +0.0% | 5 |" in w4a16
    result["rows"].append({"config": "rtn-no-rotation", "scheme": "w4a16", "ppl": 50.0, "param_overhead": 0.0,
                           "convert_s": 1.0})
    assert "| `--rtn --no-r1 --no-r2 --online '' --clip none` |" in acc.markdown_tables(result)  # shell-quoted: copy-pastable
