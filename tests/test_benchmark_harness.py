"""The benchmark harness's own decisions (benchmarks/pipeline/run_one.py), where a wrong one gives a wrong row."""

import importlib.util
from pathlib import Path

import pytest

RUN_ONE = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline" / "run_one.py"


@pytest.fixture(scope="module")
def run_one():
    spec = importlib.util.spec_from_file_location("run_one", RUN_ONE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
