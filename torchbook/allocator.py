"""The C memory allocator a torchbook process runs on (CPU tensors are plain `malloc` memory).

On Linux, glibc's `malloc` fits CPU training badly: activation checkpointing frees and re-allocates the same
large buffers block by block, and glibc either keeps them in a fragmented heap that never shrinks (SmolLM2, batch
8 x 256, LoRA: 3.2 GB peak RSS) or, with a low mmap threshold (`train/speed.py::return_freed_buffers`), returns
each one to the kernel, which zeroes it page by page when it comes back (1.4 GB, but 35-50% more CPU time).
jemalloc reuses freed buffers by size class. Its own way of returning idle pages (after a delay, even 600 s)
still costs a LoRA step 2.4 s of page faults in 8 s (the freed 10-13 MB activation buffers are purged and faulted
back); keeping every freed page costs none but grows without bound when shapes vary (an RLHF run reached 20.7
GB). So purging is off and a `DirtyPageGuard` thread purges whenever the freed pages jemalloc keeps pass a cap
(1 GiB): the low peak at the speed of no page faults, bounded (docs/benchmarks.md, "Fine-tuning memory and speed";
benchmarks/allocator.py for varying shapes).

So the `torchbook` command, when jemalloc is installed (Debian: `libjemalloc2`), re-executes itself once with it
preloaded (`LD_PRELOAD`, as Intel's `ipexrun` launcher does); `TORCHBOOK_ALLOCATOR=system` keeps the C library's,
and `TORCHBOOK_ALLOCATOR=/path/to/lib.so` names another. Python code that imports torchbook keeps the allocator its
process started with (`allocator_in_use()` says which): start it with `with_faster_allocator(os.environ)`'s
environment to get the same. This module imports nothing heavy: it runs before torch is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from torchbook.errors import UserInputError

ENV = "TORCHBOOK_ALLOCATOR"  # unset or "jemalloc": jemalloc when installed; "system": the C library's; a path
_DONE = "TORCHBOOK_ALLOCATOR_PRELOADED"  # set in the re-executed process: never re-execute twice
# Freed pages are kept (no time-based purging: with jemalloc's 10 s default a LoRA step spent 2.4 s of 8 in page
# faults); `DirtyPageGuard` bounds what is kept.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
DIRTY_MAX_ENV = "TORCHBOOK_ALLOCATOR_DIRTY_MAX_GB"  # the guard's cap on kept freed pages, in GiB (default 1)
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


class DirtyPageGuard:
    """Keeps jemalloc's freed-but-kept ("dirty") pages under `max_bytes` when its time-based purging is off.

    With purging off, buffers freed by one step are reused by the next without page faults, and a run of fixed
    shapes keeps a steady amount; when shapes vary (RLHF rollouts, a server), kept pages fragment and grow. A
    daemon thread reads jemalloc's count every `period` seconds (`mallctl("stats.arenas.<all>.pdirty")`) and
    purges all arenas when it passes the cap. Runs only in a process on jemalloc with purging off; `start()` is
    safe to call more than once, and a forked child (a DataLoader worker) starts its own."""

    _ALL_ARENAS = 4096  # jemalloc's MALLCTL_ARENAS_ALL

    def __init__(self, max_bytes: int, period: float = 0.5) -> None:
        self.max_bytes, self.period = max_bytes, period
        self.purges = 0
        self._mallctl = _mallctl()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def dirty_bytes(self) -> int:
        """Freed pages jemalloc keeps, all arenas, in bytes (the statistics refreshed first)."""
        assert self._mallctl is not None
        epoch = ctypes.c_uint64(1)
        self._mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
        pages, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        name = f"stats.arenas.{self._ALL_ARENAS}.pdirty".encode()
        if self._mallctl(name, ctypes.byref(pages), ctypes.byref(size), None, 0) != 0:
            return 0
        return pages.value * os.sysconf("SC_PAGE_SIZE")

    def purge(self) -> None:
        assert self._mallctl is not None
        self._mallctl(f"arena.{self._ALL_ARENAS}.purge".encode(), None, None, None, 0)
        self.purges += 1

    def check(self) -> None:
        if self.dirty_bytes() > self.max_bytes:
            self.purge()

    def start(self) -> bool:
        """Start the watching thread; False (nothing started) unless this process runs on jemalloc with purging
        off and its statistics readable."""
        if self.active:
            return True
        if self._mallctl is None or _jemalloc_decay_ms(self._mallctl) != -1:
            return False
        self._thread = threading.Thread(target=self._watch, name="jemalloc-dirty-page-guard", daemon=True)
        self._thread.start()
        return True

    def _watch(self) -> None:
        while True:
            time.sleep(self.period)
            self.check()


def _mallctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """jemalloc's `mallctl` in this process (None when it does not run on jemalloc)."""
    if allocator_in_use() != "jemalloc":
        return None
    function = getattr(ctypes.CDLL(None), "mallctl", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                         ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def _jemalloc_decay_ms(mallctl: ctypes._CFuncPtr) -> int | None:  # type: ignore[name-defined]
    value, size = ctypes.c_ssize_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    if mallctl(b"opt.dirty_decay_ms", ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return value.value


_guard: DirtyPageGuard | None = None


def guard_dirty_pages() -> DirtyPageGuard | None:
    """Start this process's `DirtyPageGuard` (cap: `TORCHBOOK_ALLOCATOR_DIRTY_MAX_GB`, default 1 GiB) and have
    forked children start theirs; None when the process does not need one (not on jemalloc, or purging on)."""
    global _guard
    if _guard is None:
        raw = os.environ.get(DIRTY_MAX_ENV, "1")
        try:
            cap = float(raw)
        except ValueError:
            cap = -1.0
        if not cap > 0:
            raise UserInputError(f"{DIRTY_MAX_ENV}={raw}: expected a positive number of GiB (default 1)")
        _guard = DirtyPageGuard(int(cap * 2**30))
        os.register_at_fork(after_in_child=_restart_in_child)
    return _guard if _guard.start() else None


def _restart_in_child() -> None:
    global _guard
    if _guard is not None:  # the parent's thread does not exist in a forked child
        _guard = DirtyPageGuard(_guard.max_bytes, _guard.period)
        _guard.start()
