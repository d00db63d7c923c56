"""scripts/sm90_compile_report.py: the real launches compiled for sm90 on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _report(*args: str) -> list[list[str]]:
    """The report's kernel lines, split into columns."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QUANTATTN_TRITON_AUTOTUNE": "0"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sm90_compile_report.py"), *args],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )  # fmt: skip
    return [line.split() for line in run.stdout.splitlines() if "_kernel" in line or "_decode_" in line]


@pytest.mark.parametrize(
    "args,kernels",
    [
        (("--kernel", "quantize", "--presets", "kv-int8", "--shape", "1,2,64,64"), ["_quant_kernel"] * 2),
        (("--presets", "kv-int8", "--shape", "1,4,2,256,64,1", "--block-n", "32"), ["_decode_split", "_decode_merge"]),
    ],
)
def test_sm90_compile_report_names_each_launch_with_its_resources(args, kernels, tmp_path):
    """One line per launch of the call (the quantiser's for K and V; decode's split and merge), each with the
    registers ptxas gave it (1 to 255) and, for decode's split, a main loop; the dumps are written."""
    lines = _report(*args, "--dump", str(tmp_path))
    assert [line[1] for line in lines] == kernels
    for line in lines:
        regs, loop_instrs = int(line[2]), int(line[8])
        assert 1 <= regs <= 255
        assert (loop_instrs > 0) == (line[1] == "_decode_split")
    assert len(list(tmp_path.glob("*.sass"))) == len(kernels)
