"""What Linux says of a process's memory; no imports beyond the standard library, so that the
benchmarks' light client processes can use it."""

from pathlib import Path


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS of a process, KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            values[name] = int(value.split()[0])
    return values


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process) since boot: /proc/stat's
    first line less idle and iowait."""
    import os

    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
