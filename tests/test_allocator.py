"""The allocator the `torchbook` command runs on (torchbook/allocator.py): jemalloc when installed, re-executing
once; `TORCHBOOK_ALLOCATOR` chooses; a wrong value is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from torchbook.allocator import ENV, JEMALLOC_CONF, allocator_in_use, find_jemalloc, with_faster_allocator
from torchbook.errors import UserInputError

needs_jemalloc = pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 not installed (make system-deps)")


def version(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torchbook", "--version"], capture_output=True, text=True, env=env,
                          timeout=60)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MALLOC_CONF") and not k.startswith("TORCHBOOK_ALLOCATOR")}
    return {**env, **extra}


@needs_jemalloc
def test_the_command_reexecutes_on_jemalloc_and_the_user_can_keep_the_system_allocator():
    assert allocator_in_use() in ("system", "jemalloc")  # pytest's own process: whatever it started with
    out = version(clean_env())
    assert out.returncode == 0, out.stderr
    assert "memory allocator: jemalloc" in out.stdout
    out = version(clean_env(**{ENV: "system"}))
    assert out.returncode == 0 and "memory allocator: system" in out.stdout


@needs_jemalloc
def test_environment_for_child_processes():
    env = with_faster_allocator({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"})
    assert env is not None
    assert env["LD_PRELOAD"].split() == [find_jemalloc(), "libfoo.so"]  # the user's preload kept, after it
    assert env["MALLOC_CONF"] == JEMALLOC_CONF
    assert with_faster_allocator({"MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"  # type: ignore[index]
    assert with_faster_allocator({"LD_PRELOAD": env["LD_PRELOAD"]}) is None  # already there: nothing to do
    assert with_faster_allocator({ENV: "system"}) is None


def test_a_wrong_allocator_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="no such file; accepted: jemalloc"):
        with_faster_allocator({ENV: str(tmp_path / "missing.so")})
    out = version(clean_env(**{ENV: str(tmp_path / "missing.so")}))
    assert out.returncode == 2
    assert out.stderr.startswith("torchbook: error: TORCHBOOK_ALLOCATOR=") and "Traceback" not in out.stderr
