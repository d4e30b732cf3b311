# The API tier: FastAPI under uvicorn. Never installs torch or the worker code (STYLE.md: the API
# image stays small); it enqueues work by task name and reads job state from Redis.
#
#   docker build -f deploy/api.Dockerfile -t videoqa-api:0.1.0 .
#
# Network is needed only while building (pip); the running container talks to Redis and nothing else.
FROM python:3.11.16-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# One fixed uid/gid in both images: uploads written by the API must be readable by the workers and
# artifacts written by the workers by the API, on the same shared volume. /data is created here so that
# a fresh named volume mounted on it starts out owned by that user.
RUN groupadd --system --gid 10001 videoqa \
    && useradd --system --uid 10001 --gid videoqa --create-home --home-dir /home/videoqa videoqa \
    && mkdir -p /data \
    && chown videoqa:videoqa /data

# Only the torch-free parts of the project: the contract and the API live in service/.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install '.[service]' \
    && rm -rf /src

ENV VIDEOQA_DATA_DIR=/data
USER 10001:10001
WORKDIR /home/videoqa
EXPOSE 8000

# Liveness only (/healthz): readiness (/readyz, Redis + a worker heartbeat) is the orchestrator's business.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# One process per container; scale with replicas. Graceful shutdown is capped because Server-Sent
# Events streams would otherwise hold it open.
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "30"]
