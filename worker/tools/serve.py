"""`videoqa serve`: the whole service on one machine: the API (uvicorn), Celery workers (`--workers`, one by
default) and, when no VIDEOQA_REDIS_URL is given, a redis-server of its own.

A small supervisor: children run in their own process groups (a Ctrl-C reaches only this process, which
then stops them in order: worker, API, Redis), and die with it if it is killed (Linux). Any child exiting
on its own stops the rest and makes `serve` exit non-zero. Torch-free: each worker child loads the model.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from service.contract import GPU_QUEUE
from worker.serving.allocator import PRELOAD, with_jemalloc

STOP_TIMEOUT_S = 30.0  # a worker finishes its current task within this, else it is killed (and redelivered)
INSTALL_REDIS = (
    "videoqa serve needs Redis: set VIDEOQA_REDIS_URL=redis://HOST:PORT/0 to use a running one, or install "
    "redis-server so that serve starts its own (Debian/Ubuntu: apt-get install redis-server; macOS: brew "
    "install redis)"
)


def _say(text: str) -> None:
    sys.stderr.write(f"videoqa serve: {text}\n")
    sys.stderr.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when the parent dies, so a killed `serve` leaves no orphans."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, process_group=0, preexec_fn=_die_with_parent)


def _stop(name: str, process: subprocess.Popen | None, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the child (graceful: uvicorn drains, Celery finishes its task), then SIGKILL its group."""
    if process is None:
        return
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _say(f"{name} did not stop within {timeout:.0f} s: killing it")
    try:  # its own children too (a prefork pool), whatever happened to it
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def wait_for_redis(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """PING until Redis answers, retrying with backoff; RuntimeError after `timeout` seconds."""
    import redis

    deadline, delay, error = time.monotonic() + timeout, 0.05, None
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {process.returncode}")
            try:
                client.ping()
                return
            except redis.RedisError as exc:
                error = exc
                time.sleep(delay)
                delay = min(1.0, delay * 2)
    finally:
        client.close()
    raise RuntimeError(f"Redis at {url} did not answer within {timeout:.0f} s ({error})")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def worker_environment(env: dict[str, str], workers: int) -> dict[str, str]:
    """The environment of each of `workers` worker processes on this machine."""
    worker_env = with_jemalloc(env)  # the allocator the worker is measured on (worker/serving/allocator.py)
    # OpenMP's threads sleep between parallel regions instead of spinning: the model's many small ops on a CPU
    # leave gaps between regions in which a spinning thread burns a core that the API, Redis and the worker's
    # own task threads need (bench/concurrency.py measured it). With either variable set, OpenMP's own choice
    # stands.
    if "OMP_WAIT_POLICY" not in worker_env and "GOMP_SPINCOUNT" not in worker_env:
        worker_env["OMP_WAIT_POLICY"] = "PASSIVE"
    # torch's default is a thread per core in every process: N workers would run N threads per core, each
    # waiting on the others. They share the cores instead, unless the operator chose.
    if workers > 1 and "OMP_NUM_THREADS" not in worker_env:
        worker_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return worker_env


def serve(host: str, port: int, model: str | None, data_dir: Path | None, workers: int = 1) -> int:
    """Run the service until Ctrl-C or SIGTERM -> the exit status. `workers` processes each load the model
    and share the queue (on a CPU host, or one per GPU)."""
    if workers < 1:
        _say(f"--workers must be at least 1, got {workers}")
        return 2
    env = dict(os.environ)
    if model is not None:
        env["VIDEOQA_MODEL"] = model
    if data_dir is not None:
        env["VIDEOQA_DATA_DIR"] = str(data_dir)
    data = Path(env.get("VIDEOQA_DATA_DIR", "./data")).resolve()

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    redis_server = api = None
    worker_processes: list[subprocess.Popen] = []
    try:
        if env.get("VIDEOQA_REDIS_URL"):
            url = env["VIDEOQA_REDIS_URL"]
            _say(f"Redis: {url} (VIDEOQA_REDIS_URL)")
        else:
            binary = shutil.which("redis-server")
            if binary is None:
                _say(INSTALL_REDIS)
                return 2
            # A free port rather than 6379: never collides with a Redis already running there, and two
            # `serve`s can run side by side. Its data (append-only file, fsynced on every write so that an
            # accepted job survives a crash of Redis) lives in the data directory.
            redis_port = free_port()
            (data / "redis").mkdir(parents=True, exist_ok=True)
            redis_server = _spawn(
                [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(data / "redis"),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                env,
            )  # fmt: skip
            url = env["VIDEOQA_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            _say(f"Redis: started redis-server on {url} (a free port; data in {data / 'redis'})")
        try:
            wait_for_redis(url, process=redis_server)
        except RuntimeError as error:
            _say(str(error))
            return 1
        if stopping.is_set():
            return 0

        api = _spawn(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", host, "--port", str(port)], env
        )
        worker_env = worker_environment(env, workers)
        if PRELOAD not in worker_env:
            _say("worker: libjemalloc not found; running on glibc malloc, whose heap grew faster over "
                 "repeated indexings (install libjemalloc2)")  # fmt: skip
        for index in range(workers):  # each a pool of threads on one scheduler (worker/serving/celery_app.py)
            worker_processes.append(_spawn(
                [sys.executable, "-m", "celery", "-A", "worker.serving.celery_app", "worker", "-Q", GPU_QUEUE,
                 "--loglevel", "INFO", "-n", f"videoqa-{os.getpid()}-{index}@%h"],
                worker_env,
            ))  # fmt: skip
        named = {f"worker {index}" if workers > 1 else "the worker": process
                 for index, process in enumerate(worker_processes)}  # fmt: skip
        children = {"the API": api, **named, "redis-server": redis_server}
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        announced = False
        while not stopping.wait(0.2):
            for name, process in children.items():
                if process is not None and process.poll() is not None:
                    _say(f"{name} exited with code {process.returncode}; stopping")
                    return 1
            if not announced and _healthy(f"{base}/healthz"):
                _say(f"API on {base} (docs: {base}/docs; ready once {base}/readyz says a worker is up)")
                announced = True
        _say("stopping")
        return 0
    finally:
        for index, process in enumerate(worker_processes):
            _stop(f"worker {index}", process)
        _stop("the API", api)
        _stop("redis-server", redis_server)
