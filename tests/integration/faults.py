"""Fault injection against the real stack: SIGKILL of a worker while it decodes, prefills or answers, and
while it decodes a batch of answers beside an indexing; a worker stopped (SIGSTOP) past its leases while
another takes its job over, then resumed; SIGKILL and SIGTERM of Redis during a load of uploads and asks.

A worker is one process: its Celery threads submit to the one scheduler that owns the model, so killing it
ends everything it held at once, as a lost machine would.

Shared by tests/integration/test_faults.py (each case once) and bench/faults.py (each case N times). Every
case returns an `Outcome`: whether every accepted job ended succeeded or failed with a code, how long that
took once a worker was available again, and whether the artifacts directory holds exactly one whole file
per indexed video (no temporary file left, no duplicate).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import httpx

from service.contract import Keys
from tests.conftest import RedisServer
from tests.integration.conftest import API_KEYS, Stack

TERMINAL = ("succeeded", "failed")
DEADLINE_S = 180.0  # every accepted job terminal within this of a worker being available again
# Short leases and sweeps, so that a case takes seconds (production: 30 s and 10 s).
FAULT_SETTINGS = {"lease_seconds": "3", "reaper_interval_seconds": "1", "job_attempts": "3"}
WORKER_CASES = [(target, phase) for target in ("killed", "stalled")
                for phase in ("decoding", "prefilling", "answering")] + [("killed", "batch")]  # fmt: skip
REDIS_CASES = [("redis", "SIGKILL"), ("redis", "SIGTERM")]


@dataclass
class Outcome:
    case: str
    accepted: int = 0
    terminal: int = 0
    codes: dict[str, int] = field(default_factory=dict)  # "succeeded" or the failure's code -> jobs
    recovery_s: float = 0.0  # from the worker being available again to the last job terminal
    artifacts_ok: bool = True
    problem: str = ""

    @property
    def ok(self) -> bool:
        return (self.accepted == self.terminal and self.artifacts_ok and self.recovery_s <= DEADLINE_S
                and not self.problem)  # fmt: skip


def fault_stack(redis: RedisServer, root: Path, model: Path) -> Stack:
    (root / "logs").mkdir(parents=True, exist_ok=True)
    api_keys = ",".join(f"{key}:{tenant}" for tenant, key in API_KEYS.items())
    return Stack(redis.url, root / "data", model, root / "logs", api_keys=api_keys, **FAULT_SETTINGS)


def looped_clip(source: Path, target: Path, repeats: int, width: int = 320) -> Path:
    """`source` played `repeats` times at `width` pixels, as H.264: a clip whose stages last long enough
    to be caught, yet cheap to decode."""
    with av.open(str(target), "w") as output:
        stream = output.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 25)
        with av.open(str(source)) as container:
            source_stream = container.streams.video[0]
            height = width * source_stream.height // source_stream.width // 2 * 2
        stream.width, stream.height = width, height
        index = 0
        for _ in range(repeats):
            with av.open(str(source)) as container:
                for frame in container.decode(video=0):
                    frame = frame.reformat(width=width, height=height, format="yuv420p")
                    frame.pts, frame.time_base, index = index, Fraction(1, 25), index + 1
                    output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return target


def fresh_copy(source: Path, directory: Path) -> Path:
    """`source` with random bytes appended: content no earlier case indexed (decoders ignore the tail)."""
    target = directory / f"{secrets.token_hex(4)}-{source.name}"
    target.write_bytes(source.read_bytes() + secrets.token_bytes(64))
    return target


def run_worker_case(stack: Stack, clip: Path, scratch: Path, target: str, phase: str) -> Outcome:
    """SIGKILL the worker ("killed"), or stop it until another worker has taken its job over ("stalled"),
    once its job reaches `phase` ("batch": 4 answers decoding together while a video indexes)."""
    outcome = Outcome(f"{'SIGKILL' if target == 'killed' else 'SIGSTOP'} worker while {phase}")
    client = stack.client()
    video = _upload(client, fresh_copy(clip, scratch))
    job_ids = [video["links"]["index_job"].rsplit("/", 1)[1]]
    if phase in ("answering", "batch"):
        _wait(lambda: _video_status(stack, video["id"]) in ("ready", "failed"), 120)
        if phase == "batch":  # an indexing on the same worker, and 4 answers in one batch
            job_ids = [_upload(client, fresh_copy(clip, scratch))["links"]["index_job"].rsplit("/", 1)[1]]
            job_ids += [_ask(client, video["id"], max_new_tokens=256) for _ in range(4)]
            _wait(lambda: all(_has_token(stack, job_id) for job_id in job_ids[1:]), 120)
        else:
            job_ids = [_ask(client, video["id"], max_new_tokens=256)]
            _wait(lambda: _has_token(stack, job_ids[0]), 120)
    else:  # read from Redis every few ms: a stage of the tiny model can last well under a second
        _wait(lambda: _video_status(stack, video["id"]) == phase, 120)
    outcome.accepted = len(job_ids)
    if target == "killed":
        available = _kill_worker(stack)
        _settle(stack, client, job_ids, available, outcome)
    else:
        _stall_worker(stack, client, job_ids, outcome)
    return outcome


def run_redis_case(stack: Stack, redis: RedisServer, clip: Path, scratch: Path, sig: str) -> Outcome:
    """4 uploads and 8 asks from 6 clients at once; Redis gets `sig` in the middle and is back 3 s later.
    A request answered 503 was not accepted (the client was told to retry); every 202 must end."""
    outcome = Outcome(f"{sig} Redis during 4 uploads + 8 asks")
    client = stack.client()
    ready = _upload(client, fresh_copy(clip, scratch))
    _wait(lambda: client.get(f"/videos/{ready['id']}").json()["status"] == "ready", 120)
    copies = [fresh_copy(clip, scratch) for _ in range(4)]

    def submit(n: int) -> str | None:
        with stack.client() as own:
            time.sleep(0.15 * n)
            try:
                if n < len(copies):
                    response = _post_upload(own, copies[n])
                    return (
                        response.json()["links"]["index_job"].rsplit("/", 1)[1]
                        if response.status_code == 202
                        else None
                    )
                response = own.post(
                    "/ask", json={"video_id": ready["id"], "question": f"Q{n}?", "max_new_tokens": 8}
                )
                return response.json()["id"] if response.status_code == 202 else None
            except httpx.TransportError:
                return None  # the request never got an answer: not accepted

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(submit, n) for n in range(12)]
        time.sleep(0.8)
        redis.stop(getattr(signal, sig))
        time.sleep(3)
        redis.start()
        available = time.monotonic()
        jobs = [job for job in (f.result() for f in futures) if job]
    outcome.accepted = len(jobs)
    _settle(stack, client, jobs, available, outcome)
    return outcome


# ---- the pieces ------------------------------------------------------------------------------------------


def _post_upload(client: httpx.Client, path: Path) -> httpx.Response:
    with path.open("rb") as file:
        return client.post("/videos", files={"file": (path.name, file, "video/mp4")})


def _upload(client: httpx.Client, path: Path) -> dict:
    response = _post_upload(client, path)
    assert response.status_code == 202, response.text
    return response.json()


def _ask(client: httpx.Client, video_id: str, max_new_tokens: int) -> str:
    response = client.post("/ask", json={"video_id": video_id, "question": "What happens?",
                                         "max_new_tokens": max_new_tokens})  # fmt: skip
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _video_status(stack: Stack, video_id: str) -> str | None:
    status = stack.redis.hget(Keys().video(video_id), "status")
    return None if status is None else json.loads(status)


def _has_token(stack: Stack, job_id: str) -> bool:
    events = stack.redis.xrange(Keys().job_events(job_id))
    return any(fields.get("kind") == "token" for _, fields in events)


def _kill_worker(stack: Stack) -> float:
    """SIGKILL the worker and start another -> when it was available."""
    os.killpg(stack.worker.pid, signal.SIGKILL)  # the worker and anything it started: a lost machine
    stack.worker.wait()
    stack.redis.delete(Keys().workers())  # the dead worker's heartbeat would pass for a live one
    stack.start_worker(timeout=300)
    return time.monotonic()


def _stall_worker(stack: Stack, client: httpx.Client, job_ids: list[str], outcome: Outcome) -> None:
    """SIGSTOP the worker (a paused VM, a partition): its leases lapse and the reaper sends its jobs again to
    a second worker, which finishes them. Then the first resumes: its fenced writes must change nothing."""
    stalled = stack.worker
    os.killpg(stalled.pid, signal.SIGSTOP)
    try:
        stack.redis.delete(Keys().workers())
        stack.start_worker(timeout=300)  # stack.worker is the new one now
        available = time.monotonic()
        _settle(stack, client, job_ids, available, outcome)
        before = {job_id: client.get(f"/jobs/{job_id}").json() for job_id in job_ids}
    finally:
        os.killpg(stalled.pid, signal.SIGCONT)
    time.sleep(3 * float(FAULT_SETTINGS["lease_seconds"]))  # the resumed worker's late writes land by now
    after = {job_id: client.get(f"/jobs/{job_id}").json() for job_id in job_ids}
    if after != before:
        outcome.problem = outcome.problem or f"the resumed worker changed finished jobs: {before} -> {after}"
    outcome.artifacts_ok, problem = check_artifacts(stack, client)
    outcome.problem = outcome.problem or problem
    Stack._stop(stalled)  # the takeover worker stays for the next case


def _settle(
    stack: Stack, client: httpx.Client, job_ids: list[str], available: float, outcome: Outcome
) -> None:
    deadline = available + DEADLINE_S
    remaining = set(job_ids)
    while remaining and time.monotonic() < deadline:
        for job_id in sorted(remaining):
            try:
                job = client.get(f"/jobs/{job_id}").json()
            except httpx.TransportError:
                continue
            if job.get("status") in TERMINAL:
                remaining.discard(job_id)
                code = "succeeded" if job["status"] == "succeeded" else (job["error"] or {}).get("code", "?")
                outcome.codes[code] = outcome.codes.get(code, 0) + 1
                if job["status"] == "failed" and not code:
                    outcome.problem = f"{job_id} failed without a code"
        time.sleep(0.25)
    outcome.terminal = len(job_ids) - len(remaining)
    outcome.recovery_s = round(time.monotonic() - available, 1)
    if remaining:
        outcome.problem = f"not terminal after {DEADLINE_S:.0f} s: {sorted(remaining)}"
    outcome.artifacts_ok, problem = check_artifacts(stack, client)
    outcome.problem = outcome.problem or problem


def check_artifacts(stack: Stack, client: httpx.Client) -> tuple[bool, str]:
    """No temporary file under artifacts/, and exactly the artifacts of the ready videos, each whole."""
    from worker.engine.artifact import load_artifact

    root = Path(stack.env["VIDEOQA_DATA_DIR"]) / "artifacts"
    leftovers = [p.name for p in root.rglob("*.tmp")] if root.is_dir() else []
    if leftovers:
        return False, f"half-written files left: {leftovers}"
    artifacts = [p for p in root.rglob("*.safetensors") if p.name.count(".") == 1]  # not .features.
    files = {p.relative_to(root).as_posix().removesuffix(".safetensors") for p in artifacts}
    wanted = set()
    for tenant in API_KEYS:
        for video in _every_video(stack.client(tenant)):
            if video["status"] == "ready":
                wanted.add(stack.redis.hget(Keys().video(video["id"]), "artifact_key").strip('"'))
    if files != wanted:
        return False, (f"artifacts without a ready video: {sorted(files - wanted)}; "
                       f"ready videos without an artifact: {sorted(wanted - files)}")  # fmt: skip
    for name in files:
        load_artifact(root / f"{name}.safetensors")  # raises on a damaged file
    return True, ""


def _every_video(client: httpx.Client) -> list[dict]:
    """Every page of the tenant's video list (a bench run leaves hundreds)."""
    videos, offset = [], 0
    while page := client.get("/videos", params={"limit": 100, "offset": offset}).json()["items"]:
        videos += page
        offset += len(page)
    return videos


def _wait(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.005)
    raise TimeoutError("the case never reached the state it waits for")
