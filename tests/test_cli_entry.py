"""The installed ``routealign`` command answers ``--version`` and ``--help`` without importing llm-compressor,
torch or transformers (seconds, not the tens of seconds those imports take)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_import_nothing_heavy(flag):
    code = ("import sys, routealign_cli\n"
            "try:\n"
            f"    routealign_cli.main([{flag!r}])\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "heavy = sorted(m for m in ('llmcompressor', 'torch', 'transformers', 'compressed_tensors', 'routealign')"
            " if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
    if flag == "--version":
        assert out.stdout.startswith("routealign ")
