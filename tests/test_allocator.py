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


GUARD_PROBE = """
import os, sys, time
import torch
from torchbook import allocator
guard = allocator.guard_dirty_pages()
if guard is None:
    print("no guard"); sys.exit(0)
assert guard.active
guard._thread = None  # checks below by hand, not on the thread's clock
# buffers of varying sizes (32-128 MiB), freed: with purging off jemalloc keeps their pages
buffers = [torch.ones(n * 2**20 // 4) for n in range(32, 129, 16)]
del buffers
kept = guard.dirty_bytes()
guard.check()
print("kept", kept, "after", guard.dirty_bytes(), "purges", guard.purges, "cap", guard.max_bytes)
pid = os.fork()
if pid == 0:  # a forked child (a DataLoader worker) watches its own pages
    os._exit(0 if allocator._guard is not guard and allocator._guard.active else 1)
print("child", os.waitpid(pid, 0)[1])
"""


def probe(**extra: str) -> str:
    env = with_faster_allocator(clean_env(**extra))
    assert env is not None
    out = subprocess.run([sys.executable, "-c", GUARD_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_jemalloc
def test_the_dirty_page_guard_bounds_the_freed_pages_jemalloc_keeps():
    fields = probe(TORCHBOOK_ALLOCATOR_DIRTY_MAX_GB="0.25").split()
    kept, after, purges, cap = (int(fields[i]) for i in (1, 3, 5, 7))
    assert cap == 2**28
    assert kept > 0.4 * 2**30  # purging off: the freed buffers' pages are kept (the speed: no page faults)
    assert after <= cap and purges == 1  # over the cap: purged
    assert fields[-2:] == ["child", "0"]
    # with jemalloc's own time-based purging (a user's MALLOC_CONF) there is nothing to guard
    assert probe(MALLOC_CONF="dirty_decay_ms:10000").strip() == "no guard"


@needs_jemalloc
def test_a_wrong_dirty_page_cap_is_a_clear_error():
    out = version(clean_env(TORCHBOOK_ALLOCATOR_DIRTY_MAX_GB="lots"))
    assert out.returncode == 2
    assert out.stderr.startswith("torchbook: error: TORCHBOOK_ALLOCATOR_DIRTY_MAX_GB=lots: expected a positive")
