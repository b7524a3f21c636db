"""The C memory allocator a torchbook process runs on (CPU tensors are plain `malloc` memory).

On Linux, glibc's `malloc` fits CPU training badly: activation checkpointing frees and re-allocates the same
large buffers block by block, and glibc either keeps them in a fragmented heap that never shrinks (SmolLM2, batch
8 x 256, LoRA: 3.2 GB peak RSS) or, with a low mmap threshold (`train/speed.py::return_freed_buffers`), returns
each one to the kernel, which zeroes it page by page when it comes back (1.4 GB, but 35-50% more CPU time).
jemalloc reuses freed buffers by size class and returns idle pages after a delay: the low peak at 0.9x the
speed of glibc's heap, against 0.7x (docs/benchmarks.md, "Fine-tuning memory and speed").

So the `torchbook` command, when jemalloc is installed (Debian: `libjemalloc2`), re-executes itself once with it
preloaded (`LD_PRELOAD`, as Intel's `ipexrun` launcher does); `TORCHBOOK_ALLOCATOR=system` keeps the C library's,
and `TORCHBOOK_ALLOCATOR=/path/to/lib.so` names another. Python code that imports torchbook keeps the allocator its
process started with (`allocator_in_use()` says which): start it with `with_faster_allocator(os.environ)`'s
environment to get the same. This module imports nothing heavy: it runs before torch is loaded.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from torchbook.errors import UserInputError

ENV = "TORCHBOOK_ALLOCATOR"  # unset or "jemalloc": jemalloc when installed; "system": the C library's; a path
_DONE = "TORCHBOOK_ALLOCATOR_PRELOADED"  # set in the re-executed process: never re-execute twice
# Freed pages go back to the system after 10 s (jemalloc's own default, stated). Keeping them for ever
# ("dirty_decay_ms:-1") was faster on fixed shapes (a LoRA step's system time 0.04 s instead of 2.5 s) but grows
# without bound when shapes vary: an RLHF run reached 20.7 GB and was killed for memory (docs/benchmarks.md).
JEMALLOC_CONF = "dirty_decay_ms:10000,muzzy_decay_ms:0"
_KNOWN = ("libjemalloc", "libtcmalloc")
_SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_jemalloc() -> str | None:
    """The path of an installed jemalloc shared library, or None."""
    if sys.platform != "linux":
        return None
    for folder in _SEARCH:
        path = Path(folder) / "libjemalloc.so.2"
        if path.is_file():
            return str(path)
    return ctypes.util.find_library("jemalloc")  # a bare soname: the dynamic loader finds it when preloaded


def allocator_in_use() -> str:
    """"jemalloc", "tcmalloc" or "system": the allocator this process's `malloc` resolves to (from the libraries
    mapped into it; "system" off Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in _KNOWN:
        if name in maps:
            return name.removeprefix("lib")
    return "system"


def with_faster_allocator(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with jemalloc (or `TORCHBOOK_ALLOCATOR`'s library) preloaded, or None when there is nothing to do:
    `TORCHBOOK_ALLOCATOR=system`, no such library installed, or one already preloaded. A `MALLOC_CONF` of the
    user's is kept."""
    choice = env.get(ENV, "jemalloc")
    if choice == "system" or sys.platform != "linux":
        return None
    library = find_jemalloc() if choice == "jemalloc" else choice
    if not library:
        return None
    if "/" in library and not Path(library).is_file():
        raise UserInputError(f"{ENV}={library}: no such file; accepted: jemalloc (the default: used when "
                             "installed), system (the C library's malloc) or the path of an allocator's library")
    preload = env.get("LD_PRELOAD", "")
    if any(name in preload for name in _KNOWN) or library in preload.split():
        return None
    out = dict(env)
    out["LD_PRELOAD"] = f"{library} {preload}".strip()
    if "jemalloc" in library:
        out.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return out


def reexec_with_faster_allocator() -> None:
    """Replace this process by itself with the faster allocator preloaded (the `torchbook` command's first step);
    returns without doing anything when there is none, or when this process already runs on it."""
    if os.environ.get(_DONE) or allocator_in_use() != "system":
        return
    env = with_faster_allocator(os.environ)
    if env is None:
        return
    env[_DONE] = "1"  # a library the loader could not preload leaves the system allocator: no loop
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # not executable here (a frozen or embedded Python): go on with the system allocator
        return
