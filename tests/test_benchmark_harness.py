"""The benchmark harness's own decisions (benchmarks/pipeline/run_one.py), where a wrong one gives a wrong row."""

import importlib.util
from pathlib import Path

import pytest

RUN_ONE = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline" / "run_one.py"


def _script(path: Path):
    """A benchmark script imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_one():
    return _script(RUN_ONE)


@pytest.mark.parametrize(("method", "scheme", "group_size", "requested", "expected"), [
    # llm-compressor's methods at an activation-quantized scheme: always all experts (RESULTS 14d: NaN otherwise)
    ("rtn", "NVFP4", None, False, True),
    ("gptq", "NVFP4", None, False, True),
    ("autoround", "NVFP4", None, False, True),
    # weight-only schemes, and routealign's own methods, keep what was asked
    ("gptq", "W3A16", None, False, False),
    ("gptq", "W4A16", None, True, True),
    ("none", "NVFP4", None, False, False),
    ("vsraq", "NVFP4", None, True, True),
    ("rtn", "W2A16", 64, False, False),
])
def test_all_experts_calibrated_where_activation_scales_need_them(run_one, method, scheme, group_size, requested,
                                                                   expected):
    assert run_one.calibrate_all_experts(method, scheme, group_size, requested) is expected


HEADROOM = RUN_ONE.parent / "headroom.py"


@pytest.fixture(scope="module")
def headroom():
    return _script(HEADROOM)


def _row(method, seed, ppl, valid, perfect, extra=None, **more):
    return {"model": "m", "scheme": "W3A16", "method": method, "seed": seed, "extra": extra or {}, "ppl": ppl,
            "ppl_reference": 10.0, "ppl_perfect_routing": perfect, "valid": {"ppl": valid}, "flip_rate": 0.02,
            "per_layer": [{"flip_rate": 0.01}, {"flip_rate": 0.03}], "oneshot_s": 1.0, **more}


def test_headroom_table_pairs_seeds_and_gives_the_standard_error(headroom, tmp_path, monkeypatch):
    """The same-seed difference to plain rounding and its standard error over the seeds, the perfect-routing share
    of the gap and the flip-rate slope, from rows written as run_one.py writes them."""
    import json
    import math
    import sys

    runs = tmp_path / "runs"
    rows = [_row("none", s, ppl, ppl, ppl - 0.5) for s, ppl in enumerate((11.0, 12.0, 13.0))]
    rows += [_row("vsraq", s, ppl, ppl, ppl, extra={"decide_on": "lm_head"})
             for s, ppl in enumerate((10.9, 12.0, 12.7))]
    rows.append(_row("gptq", 0, 11.0, 11.0, 11.0, moe_calibrate_all_experts=True))
    for i, row in enumerate(rows):
        (runs / str(i)).mkdir(parents=True)
        (runs / str(i) / "row.json").write_text(json.dumps(row))
    monkeypatch.setattr(sys, "argv", ["headroom.py", str(runs), "--out", str(tmp_path / "out")])
    headroom.main()
    summary = {e["method"]: e for e in json.loads((tmp_path / "out" / "headroom.json").read_text())}
    assert set(summary) == {"none", "vsraq (decide_on=lm_head)", "gptq (all experts calibrated)"}
    ours = summary["vsraq (decide_on=lm_head)"]
    diffs = [-0.1, 0.0, -0.3]  # held-out = sqrt(ppl x valid) = ppl here
    assert ours["heldout_vs_plain"] == pytest.approx(sum(diffs) / 3)
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert ours["heldout_vs_plain_se"] == pytest.approx(se)
    assert summary["none"]["perfect_share"] == pytest.approx((0.5 / 1 + 0.5 / 2 + 0.5 / 3) / 3)
    assert summary["none"]["flip_slope"] == pytest.approx(0.02)
    assert summary["gptq (all experts calibrated)"]["heldout_vs_plain_se"] is None  # one seed: no error to give
    table = (tmp_path / "out" / "headroom.md").read_text()
    assert f"{mean:+.3f} ± {se:.3f} (3)" in table
