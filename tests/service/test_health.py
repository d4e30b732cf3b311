"""/healthz, /readyz, /metrics and CORS."""

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.contract import JobStatus, Settings
from service.main import create_app
from tests.conftest import free_port
from tests.service.helpers import fake_mp4


def test_healthz_needs_nothing_and_readyz_needs_redis(tmp_path):
    nowhere = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=tmp_path)
    with TestClient(create_app(nowhere)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["error"]["code"] == "redis_unavailable"
        down = client.get("/videos")  # any route: a JSON 503, not a stack trace
        assert down.status_code == 503 and down.json()["error"]["code"] == "redis_unavailable"
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "videoqa_redis_up 0.0" in metrics.text


def test_readyz_wants_a_recent_worker_heartbeat(client, records):
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_workers"
    records.client.hset(records.keys.workers(), "stale-worker", 0)
    assert client.get("/readyz").status_code == 503
    records.heartbeat("gpu-0")
    assert client.get("/readyz").json() == {"status": "ready", "workers": ["gpu-0"]}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_exposition(client, records):
    video = client.post("/videos", files={"file": ("a.mp4", fake_mp4(), "video/mp4")}).json()
    job = client.post("/ask", json={"video_id": video["id"], "question": "Who?"}).json()
    client.get(f"/videos/{video['id']}")
    client.get("/videos/vid_unknown")
    records.update_job(job["id"], status=JobStatus.RUNNING)
    records.incr_counter("cache", "hit:memory", 2)
    records.incr_counter("cache", "miss:absent")
    records.incr_counter("cache", "corrupt")  # not a lookup result: not in videoqa_cache_requests
    records.incr_counter("engine", "compressions")
    records.incr_counter("artifact_bytes", "disk", 1234)

    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    values = samples(response.text)
    route = (("method", "GET"), ("route", "/videos/{video_id}"))
    assert values[("videoqa_http_request_duration_seconds_count", route)] == 2
    assert values[("videoqa_http_requests_total", (*route, ("status", "404")))] == 1
    assert not any("vid_" in str(labels) for _, labels in values)  # ids never become label values
    assert values[("videoqa_queue_depth", ())] == 2  # the index task and the answer task
    assert values[("videoqa_jobs", (("state", "running"),))] == 1
    assert values[("videoqa_jobs", (("state", "queued"),))] == 1  # the index job
    assert values[("videoqa_videos", (("status", "queued"),))] == 1
    lookups = {
        labels: value for (name, labels), value in values.items() if name == "videoqa_cache_requests_total"
    }
    assert lookups == {
        (("reason", ""), ("result", "hit"), ("tier", "memory")): 2,
        (("reason", "absent"), ("result", "miss"), ("tier", "none")): 1,
    }
    assert values[("videoqa_memory_tier_hit_ratio", ())] == 2 / 3  # of the lookups, not the other counts
    assert values[("videoqa_routing_decisions_total", (("reason", "shared"),))] == 1  # no worker: shared
    assert values[("videoqa_routing_decisions_total", (("reason", "holder"),))] == 0
    assert values[("videoqa_engine_events", (("event", "compressions"),))] == 1
    assert values[("videoqa_artifact_bytes", (("tier", "disk"),))] == 1234
    assert values[("videoqa_redis_up", ())] == 1 and values[("videoqa_workers_live", ())] == 0


def test_cors_only_when_origins_are_configured(make_client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    closed = make_client()
    assert "access-control-allow-origin" not in closed.options("/ask", headers=preflight).headers
    open_ = make_client(cors_origins="https://app.example, https://other.example")
    response = open_.options("/ask", headers=preflight)
    assert (
        response.status_code == 200
        and response.headers["access-control-allow-origin"] == "https://app.example"
    )
    exposed = open_.get("/healthz", headers={"Origin": "https://app.example"}).headers
    assert "location" in exposed["access-control-expose-headers"].lower()
