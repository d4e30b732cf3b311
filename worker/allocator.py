"""The C allocator a worker runs with.

With glibc's malloc a worker's peak RSS creeps up job after job: its mmap threshold rises to the size
of the largest block freed so far, so the chunk loop's large tensors of varying size end up in the heap
and fragment it (the 10-minute video: +22% over 6 indexings, bench/followup.py --part indexings). A
fixed threshold (MALLOC_MMAP_THRESHOLD_) stopped the creep but made every such block fresh mmap'd
pages. jemalloc keeps size classes apart and returns unused pages on its own: the worker runs on it
where the machine has it (Debian and Ubuntu: the libjemalloc2 package, which redis-server installs).
It has to be preloaded: it replaces malloc only for a process started with it.
"""

import ctypes.util
import os

PRELOAD = "LD_PRELOAD"


def with_jemalloc(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child process that runs on jemalloc; unchanged where the library is not installed."""
    library = ctypes.util.find_library("jemalloc")  # e.g. "libjemalloc.so.2", found on the loader's path
    if library is None:
        return env
    preload = " ".join(part for part in (library, env.get(PRELOAD, "")) if part)
    return {**env, PRELOAD: preload}


def allocator_in_use() -> str:
    """ "jemalloc" when it is loaded into this process, else "glibc malloc"."""
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            return "jemalloc" if "libjemalloc" in maps.read() else "glibc malloc"
    except OSError:  # not Linux
        return "the system's malloc"
