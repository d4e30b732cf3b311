# The GPU worker: one Celery worker on one GPU; its tasks share the GPU through one scheduler.
#
#   docker build -f deploy/worker.Dockerfile -t videoqa-worker:0.1.0 .
#
# Base image: python slim rather than nvidia/cuda. torch 2.13.0's Linux x86_64 wheel on PyPI is the CUDA
# build: it depends on NVIDIA's CUDA 13.0 runtime wheels (cuda-toolkit 13.0.3, cuDNN 9.20, NCCL 2.29),
# which pip installs next to it. So the image needs no CUDA toolkit of its own, only the host's driver,
# which the NVIDIA Container Toolkit mounts in (CUDA 13 needs driver >= 580 and a Turing or newer GPU).
# An nvidia/cuda base would ship a second copy of the same libraries.
# NVIDIA_VISIBLE_DEVICES is deliberately not set: the GPU reservation (compose) or the device plugin
# (Kubernetes) chooses the GPU; `all` in the image would hand every GPU to a container that asked for none.
#
# The model is NOT in the image: mount a volume holding the checkpoint at /models and point
# VIDEOQA_MODEL at it (docker-compose.yml's fetch-model service, or deploy/k8s/manual/fetch-model-job.yaml,
# fills that volume once). At run time the worker needs no network: the hub is switched off below.
FROM python:3.11.16-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Same uid/gid as the API image (the shared volume); /models is created so that a fresh named volume
# mounted there is writable by the fetch-model step.
RUN groupadd --system --gid 10001 videoqa \
    && useradd --system --uid 10001 --gid videoqa --create-home --home-dir /home/videoqa videoqa \
    && mkdir -p /data /models \
    && chown videoqa:videoqa /data /models

# jemalloc, preloaded below: the allocator the worker's memory is measured on (worker/serving/allocator.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

# torch and its CUDA wheels (several GB) in their own layer, so that a source change does not download
# them again. Must equal the pin in pyproject.toml's worker extra (tests/deploy checks).
RUN pip install torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
RUN pip install '.[worker,service]' \
    && rm -rf /src

ENV LD_PRELOAD=libjemalloc.so.2 \
    VIDEOQA_DATA_DIR=/data \
    VIDEOQA_MODEL=/models/Qwen2.5-VL-7B-Instruct \
    VIDEOQA_DEVICE=cuda \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/videoqa

# The pool is threads, as worker/serving/celery_app.py configures it: VIDEOQA_WORKER_CONCURRENCY tasks at
# once submit their model work to the process's one scheduler, which ends it at VIDEOQA_TASK_TIME_LIMIT's
# soft limit. No HEALTHCHECK: a worker whose model does not load exits (and is restarted), and the
# heartbeat in Redis is what the API's /readyz reports.
# Celery's warm shutdown on SIGTERM finishes the running tasks; give it time (stop_grace_period in compose,
# terminationGracePeriodSeconds in Kubernetes). acks_late re-queues a task whose worker was killed.
CMD ["celery", "-A", "worker.serving.celery_app", "worker", "-Q", "gpu", "--pool", "threads", "--loglevel", "INFO"]
