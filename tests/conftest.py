import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from worker.tools.serve import free_port


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Qwen2.5-VL and Qwen2-VL checkpoints, built once per test session."""
    from worker.tools.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


class RedisServer:
    """A real redis-server of the test's own, on a free port, that a test may stop and restart."""

    DURABLE = ["--appendonly", "yes", "--appendfsync", "always"]

    def __init__(self, directory: Path, *, durable: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.durable = durable  # an append-only file fsynced on every write: a SIGKILL loses nothing
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (Debian package redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.directory), *(self.DURABLE if self.durable else ["--appendonly", "no"])],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with `sig` (SIGTERM: a clean shutdown; SIGKILL: a crash); `start` brings it back."""
        if self.process is not None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server for the session: tests never touch the machine's shared one."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The private server's URL, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def small_volume(tmp_path):
    """mount(size) -> a directory on a tmpfs of `size` bytes of its own: writes past it fail with a real
    ENOSPC. Unmounted after the test; skipped where mounting is not allowed (no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        directory = tmp_path / f"volume{len(mounted)}"
        directory.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
        mounted.append(directory)
        return directory

    yield mount
    for directory in mounted:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """A file taking all but about `leave` bytes of the volume `directory` is on."""
    import os

    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    filler = directory / "filler"
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler
