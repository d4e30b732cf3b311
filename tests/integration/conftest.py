"""The real stack for integration tests: a private redis-server, a Celery worker process with a tiny
model, and the API served by uvicorn over real HTTP; or all of it as `videoqa serve` starts it."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.contract import Keys
from tests.conftest import free_port

API_KEYS = {"tenant-a": "key-aaaaaaaaaaaaaaaaaaaa", "tenant-b": "key-bbbbbbbbbbbbbbbbbbbb"}


class Stack:
    """Processes of one deployment, sharing a Redis, a data directory and settings."""

    def __init__(self, redis_url: str, data_dir: Path, model: Path, logs: Path, **settings: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.logs = logs
        self.env = {
            **os.environ,
            "VIDEOQA_REDIS_URL": redis_url,
            "VIDEOQA_DATA_DIR": str(data_dir),
            "VIDEOQA_MODEL": str(model),
            "VIDEOQA_DEVICE": "cpu",
            "VIDEOQA_PRESET": "tiny",
            **{f"VIDEOQA_{name.upper()}": value for name, value in settings.items()},
        }
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_api(self) -> None:
        self.api = self._spawn(
            "api", [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port",
                    str(self.port)]
        )  # fmt: skip
        self.wait_until(lambda: httpx.get(f"{self.base_url}/healthz").status_code == 200, "the API is up")

    def start_worker(self, timeout: float = 90) -> None:
        """A Celery worker as `videoqa serve` starts it: one process, its tasks in threads, one scheduler."""
        self.worker = self.spawn_worker("worker")
        self.wait_until(lambda: httpx.get(f"{self.base_url}/readyz").status_code == 200, "a worker is ready",
                        timeout)  # fmt: skip

    def spawn_worker(self, name: str) -> subprocess.Popen:
        """A Celery worker process named `name`@host, not waited for."""
        return self._spawn(
            name, [sys.executable, "-m", "celery", "-A", "worker.serving.celery_app", "worker", "-Q", "gpu",
                   "-n", f"{name}@%h", "--loglevel", "INFO"]
        )  # fmt: skip

    def stop_api(self) -> None:
        self._stop(self.api)
        self.api = None

    def stop_worker(self) -> None:
        self._stop(self.worker)
        self.worker = None
        self.redis.delete(Keys().workers())  # its heartbeat would otherwise look alive for a while

    def stop(self) -> None:
        self._stop(self.worker)
        self._stop(self.api)

    @staticmethod
    def _stop(process: subprocess.Popen | None) -> None:
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def wait_until(self, condition, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in (self.api, self.worker):
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"a process died while waiting until {what}; see {self.logs}")
            try:
                if condition():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting until {what}; see {self.logs}")

    def client(self, tenant: str = "tenant-a") -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60,
                            headers={"Authorization": f"Bearer {API_KEYS[tenant]}"})  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server, tiny_models):
    redis.Redis.from_url(redis_server.url).flushall()
    root = tmp_path_factory.mktemp("stack")
    (root / "logs").mkdir()
    api_keys = ",".join(f"{key}:{tenant}" for tenant, key in API_KEYS.items())
    stack = Stack(
        redis_server.url, root / "data", tiny_models["qwen2_5_vl"], root / "logs",
        api_keys=api_keys, max_upload_bytes=str(8 * 1024 * 1024),
    )  # fmt: skip
    try:
        stack.start_api()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


@contextlib.contextmanager
def videoqa_serve(
    directory: Path, model: Path, preset: str | None = "tiny", workers: int = 1, **settings: str
):
    """`videoqa serve` (its own redis-server, `workers` workers, the API) on a free port with `preset` (None:
    the defaults and what the checkpoint carries) -> its base URL once every worker is ready; VIDEOQA_*
    settings from the keyword arguments. Stopped with Ctrl-C's signal."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("VIDEOQA_")}
    env.update(VIDEOQA_DEVICE="cpu", **({"VIDEOQA_PRESET": preset} if preset else {}))
    env.update({f"VIDEOQA_{name.upper()}": value for name, value in settings.items()})
    args = [sys.executable, "-m", "worker.tools.cli", "serve", "--port", str(port), "--model", str(model),
            "--data-dir", str(directory / "data"), "--workers", str(workers)]  # fmt: skip
    log_path = directory / "serve.log"
    log = log_path.open("wb")
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                ready = httpx.get(f"{base}/readyz")
                if ready.status_code == 200 and len(ready.json().get("workers", [])) >= workers:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "videoqa serve did not become ready"
            time.sleep(0.3)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
