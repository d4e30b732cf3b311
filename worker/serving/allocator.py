"""The C allocator a worker runs with.

Over repeated indexings of the 10-minute video, while decoding still leaked FFmpeg buffers until the
cycle collector ran, the worker's peak RSS grew +22% over 6 indexings on glibc's malloc and +6% on
jemalloc (whose size classes fragment less). With the leak fixed, jemalloc stays flat: +1.0% over 20
(bench/followup.py --part indexings; glibc has not been measured again since). The fixed glibc mmap
threshold used before (MALLOC_MMAP_THRESHOLD_) made every large block fresh mmap'd pages. The worker
runs on jemalloc where the machine has it (Debian and Ubuntu: the libjemalloc2 package, which
redis-server installs). It has to be preloaded: it replaces malloc only for a process started with it.
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
