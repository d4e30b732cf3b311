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
