"""benchmarks/gpu_check.sh runs on every machine with --dry-run (device=cpu): the script is tested here, the GPU
itself where one is lent (docs/training.md records those runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def run(*args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=timeout)


def test_dry_run_of_the_generate_steps_reports_one_line_each() -> None:
    result = run("--only", "Llama", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("OK", "FAIL", "SKIP"))]
    assert len(lines) == 3 and all(line.startswith("OK") for line in lines), result.stdout
    assert "all steps passed or skipped" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_whole_dry_run_passes() -> None:
    result = run(timeout=1100)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recipe image-classifier (device=cpu precision=bf16)" in result.stdout
