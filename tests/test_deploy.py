"""deploy/ and docs/OPERATIONS.md: every file parses, names only real settings, commands, queues and metrics,
and the pieces agree with each other and with the worker's own timing rules.

Nothing here needs Docker, Kubernetes or systemd running. Kubernetes manifests of built-in kinds are checked
against the schemas that ship inside ``kubernetes-validate`` (dev extra); KEDA's CRDs have no schema there and
are checked field by field. The retention SQL of docs/OPERATIONS.md runs against a real PostgreSQL.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.app import DETECT_QUEUE, RESCAN_QUEUE
from worker.cli import build_parser
from worker.settings import Settings, SettingsError, env_names

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
DOCKER = DEPLOY / "docker"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / "ppl.env.example"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
DOCKERIGNORE = REPO / ".dockerignore"
NOT_OURS = DEPLOY / "local"  # the local services script: its PPL_SERVICES_DIR is not a worker setting

MODEL_MOUNT = "/models/current"
WORKER_SERVICES = ("worker-gpu", "worker-cpu")  # compose services that load a model and consume `detect`
PER_PROCESS = ("PPL_DEVICE", "PPL_METRICS_PORT")  # must differ between the instances on one host
PPL_NAME = re.compile(r"\bPPL_[A-Z0-9_]+\b")
CRD_GROUPS = {"keda.sh"}


# ------------------------------------------------------------------------------------------------ helpers


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and NOT_OURS not in p.parents)


def yaml_files() -> list[Path]:
    return sorted(p for p in deploy_files() if p.suffix in (".yml", ".yaml"))


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(active NAME=value lines, names of commented-out ``# NAME=`` lines)."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in path.read_text().splitlines():
        if match := re.match(r"^(PPL_[A-Z0-9_]+)=(.*)$", line):
            active[match[1]] = match[2]
        elif match := re.match(r"^#\s*(PPL_[A-Z0-9_]+)=", line):
            commented.add(match[1])
    return active, commented


def settings_from(environ: dict[str, str], where: str) -> Settings:
    try:
        return Settings.from_env({k: str(v) for k, v in environ.items()})
    except SettingsError as exc:
        pytest.fail(f"{where}: {exc}")


def parse_ppl_worker(argv: list[str], where: str):
    """The real ``ppl-worker`` parser on ``argv``: a misspelt subcommand or flag fails here, not in production."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `ppl-worker {shlex.join(argv)}` is not a valid ppl-worker command line")


def worker_queues(args) -> set[str]:
    return {q.strip() for q in args.queues.split(",") if q.strip()}


def check_celery_app_path(argv: list[str], where: str) -> None:
    """``celery -A module:attr ...``: the app path must import."""
    assert "-A" in argv, f"{where}: celery without -A: {argv}"
    module, _, attr = argv[argv.index("-A") + 1].partition(":")
    app = getattr(importlib.import_module(module), attr or "app", None)
    assert app is not None and app.main == "ppl", f"{where}: -A {module}:{attr} is not the worker's Celery app"


def check_heartbeat_probe(command: list[str], settings: Settings, where: str) -> None:
    """A worker's liveness check is ``ppl-worker health`` over the heartbeat file the worker itself keeps (a
    ping over the broker answers from a process that has stopped consuming)."""
    assert command[0] == "ppl-worker", f"{where}: the health check is not ppl-worker health: {command}"
    args = parse_ppl_worker(command[1:], where)
    assert args.command == "health" and args.max_age >= 60, f"{where}: {command}"
    assert settings.heartbeat_file is not None, f"{where}: PPL_HEARTBEAT_FILE unset, so health always fails"


def required_drain_s(settings: Settings) -> float:
    """The longest a running batch can take to finish after SIGTERM: fetch rounds at the timeouts, plus the
    database retries of an outage (inference itself is seconds)."""
    rounds = math.ceil(settings.batch_size / settings.decode_threads)
    fetch = rounds * (settings.fetch_connect_timeout_s + settings.fetch_read_timeout_s)
    return fetch + settings.database_retry_s


def required_visibility_s(settings: Settings) -> float:
    """docs/OPERATIONS.md: every prefetched batch ahead (taken as if run one after another) plus its own, each
    with its database retries, plus the longest retry countdown a held job waits out."""
    longest_countdown = settings.retry_backoff_s * 2 ** max(0, settings.max_retries - 1)
    return (settings.prefetch_count / settings.batch_size + 1) * required_drain_s(settings) + longest_countdown


def duration_s(text: str | int) -> float:
    """Compose/systemd durations: ``300``, ``300s``, ``5m``, ``1m30s``."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "min": 60, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|h|m|s)?", text.strip())
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


# ------------------------------------------------------------------------------------------------ files


def test_every_yaml_file_parses():
    files = yaml_files()
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"docker-compose.yml", "k8s/kustomization.yaml", "k8s/worker-gpu.yaml", "k8s/beat.yaml",
            "k8s/keda-scaledobject.yaml", "k8s/migrate-job.yaml", "k8s/configmap.yaml", "k8s/secret.yaml",
            "k8s/namespace.yaml"} <= names
    for path in files:
        docs = load_all(path)
        assert docs, f"{path}: no YAML documents"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


def test_every_ppl_name_in_deploy_files_and_the_guide_is_a_setting():
    known = set(env_names())
    found: dict[str, set[str]] = {}
    for path in [*deploy_files(), OPERATIONS]:
        for name in PPL_NAME.findall(path.read_text()):
            found.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    unknown = {name: sorted(where) for name, where in found.items() if name not in known}
    assert not unknown, f"not settings in worker/settings.py (typos?): {unknown}"
    assert len(found) >= len(known) // 2, "the scan found too few names to be looking at the right files"


def test_env_example_lists_every_setting_and_its_values_parse():
    active, commented = env_file(ENV_EXAMPLE)
    missing = [name for name in env_names() if name not in active and name not in commented]
    assert not missing, f"deploy/ppl.env.example does not list {missing}"
    # systemd: EnvironmentFile= overrides Environment=, so per-process settings here would put every
    # ppl-worker@N on the same GPU and metrics port.
    assert not set(PER_PROCESS) & set(active), f"{PER_PROCESS} must stay commented out in the env example"
    settings = settings_from(active, "deploy/ppl.env.example")
    assert settings.model_dir == Path(MODEL_MOUNT)
    assert settings.visibility_timeout_s > required_visibility_s(settings), (
        f"PPL_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} is below the worst wait of a prefetched job "
        f"({required_visibility_s(settings):.0f} s): Redis would hand jobs still queued in a worker to another")


# ------------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_all(COMPOSE)
    return doc


def service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    """What the container sees: env_file entries (relative to the compose file), then `environment`."""
    service = compose["services"][name]
    env: dict[str, str] = {}
    files = service.get("env_file") or []
    for entry in [files] if isinstance(files, str) else files:
        path = COMPOSE.parent / (entry if isinstance(entry, str) else entry["path"])
        assert path.is_file(), f"compose service {name}: env_file {path} does not exist"
        env.update(env_file(path)[0])
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: str(v) for k, v in environment.items()})
    return env


def volume_parts(volume: str | dict[str, Any]) -> tuple[str, str, str]:
    """(source, target, mode) of a compose volume; a source may be ``${VAR:-default}``, colons and all."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"], "ro" if volume.get("read_only") else "rw"
    match = re.match(r"^(\$\{[^}]*\}[^:]*|[^:]+):([^:]+)(?::(\w+))?$", volume)
    assert match, f"unreadable compose volume {volume!r}"
    return match[1], match[2], match[3] or "rw"


def dockerfile_of(compose: dict[str, Any], name: str) -> Path:
    build = compose["services"][name]["build"]
    return (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()


def test_compose_services_volumes_profiles_and_dependencies(compose):
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "worker-gpu", "worker-cpu", "rescan-worker", "beat", "flower"} <= set(
        services)
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume_parts(volume)[0]
            if not source.startswith(("/", ".", "~", "$")):  # a named volume, not a bind mount
                assert source in declared, f"compose service {name} uses undeclared volume {source!r}"
                used.add(source)
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on undefined service {dependency}"
            target = services[dependency]
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {dependency} to be healthy; it has no healthcheck"
            if condition.get("condition") == "service_completed_successfully":
                assert target.get("restart", "no") == "no", f"{dependency} must be one-shot for {name} to wait on it"
            assert not set(target.get("profiles") or []) - set(service.get("profiles") or []), (
                f"{name} depends on {dependency}, which only runs under a profile {name} lacks")
        if "build" in service:
            assert dockerfile_of(compose, name).is_file(), f"{name}: no Dockerfile at {dockerfile_of(compose, name)}"
    assert used == declared, f"declared but unused volumes: {declared - used}"
    profiles = {name: tuple(s.get("profiles") or ()) for name, s in services.items()}
    assert profiles["worker-cpu"] == ("cpu",) and profiles["flower"] == ("flower",)
    assert {name for name, p in profiles.items() if p} == {"worker-cpu", "flower"}, "the core services need no profile"


def test_compose_redis_is_durable_and_postgres_checked(compose):
    redis, postgres = compose["services"]["redis"], compose["services"]["postgres"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command and "--appendfsync always" in command
    assert "--maxmemory-policy noeviction" in command, "a broker must never evict a queue"
    assert "/data" in {volume_parts(v)[1] for v in redis["volumes"]}
    assert postgres["image"] == "postgres:16" and "healthcheck" in postgres
    assert "/var/lib/postgresql/data" in {volume_parts(v)[1] for v in postgres["volumes"]}
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["migrate"] and "entrypoint" not in migrate
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_workers_run_ppl_worker_on_their_queues(compose):
    services = compose["services"]
    for name in (*WORKER_SERVICES, "rescan-worker"):
        service = services[name]
        assert "entrypoint" not in service, f"{name} overrides the image's ppl-worker entrypoint"
        assert dockerfile_entrypoint(dockerfile_of(compose, name)) == ["ppl-worker"]
        args = parse_ppl_worker(service["command"], f"compose {name}")
        assert args.command == "run"
        expected = {RESCAN_QUEUE} if name == "rescan-worker" else {DETECT_QUEUE}
        assert worker_queues(args) == expected, f"compose {name} consumes {worker_queues(args)}"
        node = args.hostname
        assert node and node.endswith("@%h"), f"{name}: give each worker a node name (NAME@%h)"
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"compose {name}: run the health check without a shell"
        check_heartbeat_probe(test[1:], settings_from(service_env(compose, name), f"compose {name}"),
                              f"compose {name}")
        assert duration_s(service["stop_grace_period"]) >= required_drain_s(Settings.from_env({}))
    gpu = services["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    for name in WORKER_SERVICES:
        env = service_env(compose, name)
        assert env["PPL_MODEL_DIR"] == MODEL_MOUNT
        assert int(services[name]["shm_size"].rstrip("m")) >= 256, f"{name}: room in /dev/shm for the crops"
        assert (MODEL_MOUNT, "ro") in {volume_parts(v)[1:] for v in services[name]["volumes"]}, (
            f"{name}: the model directory must be mounted read-only at {MODEL_MOUNT}")
    assert service_env(compose, "worker-cpu")["PPL_BACKEND"] in ("torch", "onnxruntime")
    assert dockerfile_of(compose, "worker-gpu").name == "Dockerfile.gpu"


def test_compose_beat_and_flower_point_at_the_same_broker(compose):
    beat = compose["services"]["beat"]
    assert beat["entrypoint"] == ["celery"] and "beat" in beat["command"]
    check_celery_app_path(beat["command"], "compose beat")
    assert "deploy" not in beat or beat["deploy"].get("replicas", 1) == 1
    broker = service_env(compose, "worker-gpu")["PPL_BROKER_URL"]
    assert service_env(compose, "beat")["PPL_BROKER_URL"] == broker
    flower = compose["services"]["flower"]
    assert flower["image"].startswith("mher/flower")
    assert flower["environment"]["CELERY_BROKER_URL"] == broker
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"]), "Flower has no auth: loopback only"


# ------------------------------------------------------------------------------------------------ images


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_entrypoint(path: Path) -> list[str]:
    (entry,) = [args for keyword, args in dockerfile_instructions(path) if keyword == "ENTRYPOINT"]
    return json.loads(entry)


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line.lstrip("/") for line in lines if line and not line.startswith("#")]


def dockerignored(relative: str) -> bool:
    """Docker's rules, as far as these patterns go: a pattern matches the path or any folder above it;
    ``**/`` matches any depth including none; ``!`` re-includes."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        variants = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch(c, v) for c in candidates for v in variants):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfiles_install_the_repository_as_a_non_root_ppl_worker_image(name):
    path = DOCKER / name
    instructions = dockerfile_instructions(path)
    args = {m[1]: m[2] for k, a in instructions if k == "ARG" and (m := re.match(r"(\w+)=(\S+)", a))}
    (base,) = [a for k, a in instructions if k == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
    if name == "Dockerfile.gpu":
        assert base.startswith("nvcr.io/nvidia/tensorrt:"), base
    else:
        assert base == "python:3.11-slim", base
    keywords = [k for k, _ in instructions]
    assert json.loads(dict(instructions)["CMD"]) == ["run"]
    assert dockerfile_entrypoint(path) == ["ppl-worker"]
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert ("WORKDIR", "/app") in instructions
    runs = [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]].strip('"'), a) for k, a in instructions if k == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch" in r and "--index-url" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install --no-deps -e (/app|\.)(\s|$)", r))
    lock_at = next(i for i, r in enumerate(runs) if re.search(r"pip install -r requirements\.lock(\s|$)", r))
    assert torch_at < lock_at < project_at, "torch from its index, then the lock, then the project on top"
    if name == "Dockerfile.cpu":
        assert "https://download.pytorch.org/whl/cpu" in runs[torch_at]
    copied: set[str] = set()
    for keyword, arguments in instructions:
        if keyword == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such path in the repository"
                assert not dockerignored(source), f"{name}: COPY {source}, but .dockerignore excludes it"
                copied.add(source.rstrip("/"))
    # worker/db.py finds alembic.ini and migrations/ next to the package; the package needs its metadata
    assert {"alembic.ini", "migrations", "worker", "ppl_model", "pyproject.toml", "README.md"} <= copied


def test_dockerignore_keeps_local_state_out_and_the_sources_in():
    for path in (".venv/bin/python", ".git/HEAD", "runs/demo/ppl/model.json", ".services/redis/dump.rdb",
                 "worker/__pycache__/app.cpython-311.pyc", ".pytest_cache/v/cache/nodeids", ".ruff_cache/x",
                 "ppl_detector.egg-info/PKG-INFO", "some/model.safetensors", "deploy/prod.env"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    for path in ("worker/app.py", "ppl_model/cli.py", "migrations/env.py", "alembic.ini", "pyproject.toml",
                 "README.md", "deploy/ppl.env.example"):
        assert not dockerignored(path), f".dockerignore excludes {path}, which the images need"


# ------------------------------------------------------------------------------------------------ kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest, for every manifest the kustomization lists."""
    resources: dict[tuple[str, str], dict[str, Any]] = {}
    for path in kustomization_resources():
        for doc in load_all(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in resources, f"{key} defined twice"
            resources[key] = doc
    return resources


def kustomization() -> dict[str, Any]:
    (doc,) = load_all(K8S / "kustomization.yaml")
    return doc


def kustomization_resources() -> list[Path]:
    return [K8S / name for name in kustomization()["resources"]]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    return found


def container_env(k8s, c: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            env.update(k8s[("Secret", source["secretRef"]["name"])]["stringData"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def test_kustomization_lists_every_manifest_and_pins_every_image(k8s):
    listed = {p.name for p in kustomization_resources()}
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"not in kustomization.yaml: {on_disk - listed}; listed but missing: {listed - on_disk}"
    assert kustomization()["namespace"] == k8s[("Namespace", "ppl")]["metadata"]["name"]
    image_names = {image["name"] for image in kustomization()["images"]}
    used = {c["image"] for doc in k8s.values() if doc["kind"] in ("Deployment", "Job") for c in containers(doc)}
    assert used == image_names, f"images used {used} != images kustomize rewrites {image_names}"


def test_k8s_built_in_kinds_match_the_kubernetes_schemas(k8s):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install -e '.[dev]' installs kubernetes-validate (schemas included)")
    checked = 0
    for (kind, name), doc in k8s.items():
        if doc["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue  # no schema ships for a CRD; KEDA's are checked field by field below
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name} does not match the Kubernetes 1.30 schema: {exc.message} at "
                        f"{'/'.join(str(p) for p in exc.path)}")
        checked += 1
    assert checked >= 8


def test_kustomize_builds_the_manifests():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(built) == sum(len(load_all(p)) for p in kustomization_resources())
    rewritten = {f"{i['newName']}:{i['newTag']}" for i in kustomization()["images"]}
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"], doc["metadata"]["name"]
        if doc["kind"] in ("Deployment", "Job"):
            assert {c["image"] for c in containers(doc)} <= rewritten, doc["metadata"]["name"]


def test_k8s_settings_split_between_configmap_and_secret_and_parse(k8s):
    config = k8s[("ConfigMap", "ppl-config")]["data"]
    secret = k8s[("Secret", "ppl-secrets")]["stringData"]
    assert {"PPL_DATABASE_URL", "PPL_BROKER_URL"} <= set(secret), "connection URLs belong in the Secret"
    assert not {"PPL_DATABASE_URL", "PPL_BROKER_URL"} & set(config), "passwords in a ConfigMap"
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values must be strings"
    settings = settings_from(config | secret, "k8s ConfigMap + Secret")
    assert settings.visibility_timeout_s > required_visibility_s(settings)
    for doc in k8s.values():
        if doc["kind"] in ("Deployment", "Job"):
            for c in containers(doc):
                for source in c.get("envFrom", []):
                    ref = ("ConfigMap", source["configMapRef"]["name"]) if "configMapRef" in source else (
                        "Secret", source["secretRef"]["name"])
                    assert ref in k8s, f"{doc['metadata']['name']}/{c['name']} reads undefined {ref}"
                settings_from(container_env(k8s, c), f"{doc['metadata']['name']}/{c['name']}")


def test_k8s_deployment_selectors_match_their_pods(k8s):
    for (kind, name), doc in k8s.items():
        if kind == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), f"{name}: selector {selector} does not match {labels}"


def test_k8s_gpu_worker(k8s):
    deployment = k8s[("Deployment", "ppl-worker-gpu")]
    spec = pod_spec(deployment)
    worker = container(deployment, "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    args = parse_ppl_worker(worker["args"], "k8s worker")
    assert args.command == "run" and worker_queues(args) == {DETECT_QUEUE}
    env = container_env(k8s, worker)
    assert env["PPL_MODEL_DIR"] == MODEL_MOUNT
    settings = settings_from(env, "k8s worker")
    # preflight: the same image, settings, mounts and GPU, running the full doctor (model included)
    (preflight,) = spec["initContainers"]
    assert parse_ppl_worker(preflight["args"], "k8s preflight").command == "doctor"
    assert not parse_ppl_worker(preflight["args"], "k8s preflight").skip_model
    for key in ("image", "envFrom", "env", "volumeMounts", "resources"):
        assert preflight[key] == worker[key], f"the preflight's {key} differs from the worker's"
    # decode processes hand crops back through /dev/shm: a memory volume, not the runtime's 64 MB default
    (shm,) = [m["name"] for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == shm]
    assert volume["emptyDir"]["medium"] == "Memory"
    # the model, read-only, from a volume the kustomization defines
    (mount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == MODEL_MOUNT]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in k8s
    # probes: readiness through ppl-worker doctor, liveness through this worker's heartbeat
    readiness = worker["readinessProbe"]["exec"]["command"]
    assert readiness[0] == "ppl-worker" and parse_ppl_worker(readiness[1:], "readiness").command == "doctor"
    check_heartbeat_probe(worker["livenessProbe"]["exec"]["command"], settings, "k8s worker liveness")
    # a warm shutdown finishes the batch in flight
    assert spec["terminationGracePeriodSeconds"] >= required_drain_s(settings)
    # metrics: the port the worker serves, announced to Prometheus
    (port,) = [p for p in worker["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == settings.metrics_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    service = k8s[("Service", "ppl-worker-metrics")]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in worker["ports"]}


def test_k8s_beat_rescan_worker_and_migrate_job(k8s):
    beat = k8s[("Deployment", "ppl-beat")]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate", "a rolling update would run two beats at once"
    (c,) = pod_spec(beat)["containers"]
    assert c["command"] == ["celery"] and "beat" in c["args"]
    check_celery_app_path(c["args"], "k8s beat")
    rescan = k8s[("Deployment", "ppl-rescan-worker")]
    worker = container(rescan, "worker")
    args = parse_ppl_worker(worker["args"], "k8s rescan worker")
    assert worker_queues(args) == {RESCAN_QUEUE}
    check_heartbeat_probe(worker["livenessProbe"]["exec"]["command"],
                          settings_from(container_env(k8s, worker), "k8s rescan worker"), "k8s rescan liveness")
    job = k8s[("Job", "ppl-migrate")]
    assert job["spec"]["backoffLimit"] >= 1
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")
    (c,) = pod_spec(job)["containers"]
    assert parse_ppl_worker(c["args"], "k8s migrate").command == "migrate"


def test_no_deployed_worker_consumes_detect_and_rescan_together(k8s, compose):
    """A rescan task holds a worker's only slot while it waits for `detect` to drain: a worker on both queues
    stops detecting for the whole rescan, and deadlocks if it is the only detect consumer."""
    lines: list[tuple[str, list[str]]] = []
    lines += [(f"compose {n}", s["command"]) for n, s in compose["services"].items()
              if isinstance(s.get("command"), list) and s["command"][:1] == ["run"]]
    lines += [(f"k8s {d['metadata']['name']}", c["args"]) for d in k8s.values() if d["kind"] == "Deployment"
              for c in containers(d) if c.get("args", [])[:1] == ["run"]]
    lines += [(f"systemd {u}", argv) for u, argv in systemd_ppl_worker_commands() if argv[:1] == ["run"]]
    assert len(lines) >= 6
    for where, argv in lines:
        queues = worker_queues(parse_ppl_worker(argv, where))
        assert len(queues) == 1 and queues <= {DETECT_QUEUE, RESCAN_QUEUE}, f"{where} consumes {queues}"


def test_keda_scales_the_gpu_worker_on_the_detect_list(k8s):
    scaled = k8s[("ScaledObject", "ppl-worker-gpu")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in k8s
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert metadata["listName"] == DETECT_QUEUE
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata values are strings"
    assert int(metadata["listLength"]) > 0
    assert "address" not in metadata and "password" not in metadata, "credentials go through the Secret"
    auth = k8s[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    parameters = {}
    for ref in auth["spec"]["secretTargetRef"]:
        secret = k8s[("Secret", ref["name"])]["stringData"]
        assert ref["key"] in secret, f"TriggerAuthentication reads missing key {ref['key']} of {ref['name']}"
        parameters[ref["parameter"]] = secret[ref["key"]]
    assert "address" in parameters
    # the same Redis and database index as the workers' broker
    broker = k8s[("Secret", "ppl-secrets")]["stringData"]["PPL_BROKER_URL"]
    match = re.match(r"rediss?://(?:[^@/]*@)?([^/]+)/(\d+)$", broker)
    assert match, broker
    assert parameters["address"] == match[1]
    assert metadata.get("databaseIndex", "0") == match[2]


# ------------------------------------------------------------------------------------------------ systemd


def unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; repeated keys (Environment=) kept in order."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {line}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(path: Path, key: str) -> str:
    values = [v for _, k, v in unit(path) if k == key]
    assert len(values) == 1, f"{path.name}: {key} set {len(values)} times"
    return values[0]


def unit_environment(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for _, key, value in unit(path):
        if key == "Environment":
            for item in shlex.split(value):
                name, _, val = item.partition("=")
                env[name] = val
    return env


def systemd_ppl_worker_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted(SYSTEMD.glob("*.service")):
        for _, key, value in unit(path):
            if key.startswith("Exec"):
                argv = shlex.split(value.lstrip("-@+!:"))
                if Path(argv[0]).name == "ppl-worker":
                    found.append((path.name, [a.replace("%%", "%") for a in argv[1:]]))
    return found


def test_systemd_units_exist_and_every_percent_is_meant():
    names = {p.name for p in SYSTEMD.glob("*.service")}
    assert {"ppl-worker@.service", "ppl-beat.service", "ppl-migrate.service"} <= names
    for path in SYSTEMD.glob("*.service"):
        for _, key, value in unit(path):
            # systemd expands %X in these lines itself: %h would become the user's home directory, not the host
            leftover = re.findall(r"%[^%]", value.replace("%%", ""))
            allowed = {"%i"} if path.name.endswith("@.service") else set()
            assert set(leftover) <= allowed, f"{path.name} {key}= uses systemd specifiers {leftover}; write %% "


def test_systemd_gpu_worker_template():
    path = SYSTEMD / "ppl-worker@.service"
    assert unit_value(path, "EnvironmentFile") == "/etc/ppl/ppl.env"
    env = unit_environment(path)
    assert env["CUDA_VISIBLE_DEVICES"] == "%i", "each instance sees only its GPU"
    assert env["PPL_DEVICE"] == "cuda:0", "with CUDA_VISIBLE_DEVICES=%i the process's only GPU is cuda:0"
    assert env["PPL_METRICS_PORT"].endswith("%i"), "one metrics port per instance"
    assert unit_value(path, "Restart") == "always"
    assert unit_value(path, "KillSignal") == "SIGTERM"
    assert duration_s(unit_value(path, "TimeoutStopSec")) >= required_drain_s(Settings.from_env({}))
    exec_start = shlex.split(unit_value(path, "ExecStart"))
    assert exec_start[0] == "/opt/ppl/.venv/bin/ppl-worker"
    args = parse_ppl_worker([a.replace("%%", "%") for a in exec_start[1:]], "ppl-worker@.service")
    assert args.command == "run" and worker_queues(args) == {DETECT_QUEUE}
    assert "%i" in args.hostname and args.hostname.endswith("@%h"), "unique node names: gpu%i@<host>"
    pre = shlex.split(unit_value(path, "ExecStartPre"))
    assert parse_ppl_worker(pre[1:], "ExecStartPre").command == "doctor"
    for name, value in env.items():
        if name.startswith("PPL_"):
            settings_from({name: value.replace("%i", "0")}, f"ppl-worker@.service {name}")


def test_systemd_beat_migrate_and_rescan_units():
    beat = shlex.split(unit_value(SYSTEMD / "ppl-beat.service", "ExecStart"))
    assert beat[0] == "/opt/ppl/.venv/bin/celery" and "beat" in beat
    check_celery_app_path(beat[1:], "ppl-beat.service")
    migrate = SYSTEMD / "ppl-migrate.service"
    assert unit_value(migrate, "Type") == "oneshot"
    assert shlex.split(unit_value(migrate, "ExecStart"))[1:] == ["migrate"]
    rescan = shlex.split(unit_value(SYSTEMD / "ppl-rescan-worker.service", "ExecStart"))
    assert worker_queues(parse_ppl_worker([a.replace("%%", "%") for a in rescan[1:]], "rescan unit")) == {
        RESCAN_QUEUE}
    for name in ("ppl-beat.service", "ppl-migrate.service", "ppl-rescan-worker.service"):
        assert unit_value(SYSTEMD / name, "EnvironmentFile") == "/etc/ppl/ppl.env"


def test_systemd_analyze_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    true = shutil.which("true")
    assert true
    names = []
    for path in SYSTEMD.glob("*.service"):
        # verify wants the executables to exist; the installed paths (/opt/ppl/.venv/bin/...) do not here
        text = re.sub(r"/opt/ppl/\.venv/bin/[\w-]+", true, path.read_text())
        name = path.name.replace("@.service", "@0.service")
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    result = subprocess.run([analyze, "verify", "--man=no", *names], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


# ------------------------------------------------------------------------------------------------ the guide


def metric_names() -> set[str]:
    """Every sample name the worker's metrics export (counters as *_total, histograms as *_bucket, ...)."""
    from prometheus_client.metrics import MetricWrapperBase

    from worker import metrics

    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                        "gauge": ()}[family.type]
            names |= {family.name, *(family.name + s for s in suffixes)}
    return names


def test_operations_guide_names_only_real_metrics_and_covers_the_alerts():
    text = OPERATIONS.read_text()
    known = metric_names()
    named = set(re.findall(r"\bppl_[a-z0-9_]+\b", text))
    assert not named - known, f"docs/OPERATIONS.md names metrics worker/metrics.py does not define: {named - known}"
    for needed in ("ppl_failures_total", "ppl_batches_requeued_total", "ppl_stage_seconds_bucket",
                   "ppl_images_processed_total"):
        assert needed in text, f"the alerts should use {needed}"
    for needed in ("docs/PERFORMANCE.md", "PPL_VISIBILITY_TIMEOUT_S", "PPL_DATABASE_RETRY_S", "Sentinel",
                   "Redis Cluster", "quorum", "ppl-worker rescan", "pg_dump", "WAL", "PPL_URL_ALLOWLIST",
                   "PPL_FILE_ROOTS"):
        assert needed in text, f"docs/OPERATIONS.md does not cover {needed}"
