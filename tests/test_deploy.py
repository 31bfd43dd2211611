"""The deployment files, checked without a container engine or a cluster.

* docker-compose.yml against the Compose specification's JSON schema (bundled by the npm package dclint, which
  `make test` installs into tests/deploy/node_modules), plus what the schema cannot see: references, the GPU
  workers, the grace period, Flower's authentication.
* deploy/k8s rendered by `kubectl kustomize` (the machine's kubectl; without it the base's files are read as they
  are), every object validated against the Kubernetes schemas bundled by kubernetes-validate (strict: a misspelt
  field is an error) and the two custom resources against deploy/schemas/; then the wiring between the objects.
* Every setting of core.settings.Settings: documented in the README and set in compose and in the Kubernetes
  config, or listed in deploy/settings-defaults.txt.
* The API image: the API runs from exactly the folders Dockerfile copies, with every package outside the base
  dependencies unimportable.
* Worker refusals: `slidesynth worker` with settings that contradict the deployment exits non-zero, naming the
  setting.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.deploy

COMPOSE = REPO / "docker-compose.yml"
COMPOSE_SCHEMA = REPO / "tests/deploy/node_modules/dclint/schemas/compose.schema.json"
K8S = REPO / "deploy/k8s"
OVERLAY = K8S / "overlays/production"
BASE = K8S / "base"
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): REPO / "deploy/schemas/keda-scaledobject.json",
               ("monitoring.coreos.com/v1", "ServiceMonitor"): REPO / "deploy/schemas/servicemonitor.json"}
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests target (policy/v1, autoscaling/v2 behaviour)
DEFAULTS_FILE = REPO / "deploy/settings-defaults.txt"
SECRET_KEYS_FILE = K8S / "secrets.example.env"
# The keys the KEDA redis scaler reads from a trigger's metadata (kedacore/keda pkg/scalers/redis_scaler.go)
REDIS_TRIGGER_KEYS = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                      "sentinelUsername", "sentinelPassword", "sentinelMaster", "unsafeSsl", "listLength",
                      "activationListLength", "listName", "databaseIndex", "enableTLS"}


# --- helpers ---------------------------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@lru_cache
def compose_validator():
    import jsonschema

    if not COMPOSE_SCHEMA.is_file():
        pytest.fail(f"{COMPOSE_SCHEMA.relative_to(REPO)} is missing: `make deploy-deps` (part of `make test`) "
                    "installs it from the npm registry")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return jsonschema.Draft7Validator(schema)


def compose_errors(doc: dict) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in compose_validator().iter_errors(doc)]


def interpolated_default(value):
    """`${VAR:-default}` → default (what compose uses when VAR is unset); other values as they are."""
    if isinstance(value, str):
        match = re.fullmatch(r"\$\{\w+:?-(.*)\}", value)
        if match:
            return match.group(1)
    return value


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


@lru_cache
def rendered() -> tuple[tuple[dict, ...], str]:
    """The overlay's objects and how they were obtained."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return tuple(d for d in yaml.safe_load_all(out.stdout) if d), "kubectl kustomize"
    docs = []
    for folder in (OVERLAY, BASE):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            path = (folder / resource).resolve()
            if path.is_file():
                docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    namespace = yaml.safe_load((BASE / "kustomization.yaml").read_text())["namespace"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"].setdefault("namespace", namespace)
    return tuple(docs), "the files as written (no kubectl: kustomize transformations not applied)"


def objects(kind: str) -> list[dict]:
    return [d for d in rendered()[0] if d["kind"] == kind]


def one(kind: str, name: str) -> dict:
    found = [d for d in objects(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def k8s_errors(doc: dict) -> list[str]:
    """Schema errors of one object: Kubernetes' own kinds through kubernetes-validate (strict), the CRDs through
    deploy/schemas/. A kind with no schema is an error: nothing goes unvalidated."""
    import jsonschema
    import kubernetes_validate

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        return [f"{e.json_path}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def configmap_settings() -> dict[str, str]:
    return one("ConfigMap", "slidesynth-config")["data"]


def deployed_settings():
    from core.settings import Settings

    env = {k: v for k, v in configmap_settings().items()}
    return Settings(**{k.removeprefix("SLIDESYNTH_").lower(): v for k, v in env.items() if v != ""},
                    _env_file=None)


def pod_spec(kind: str, name: str) -> dict:
    return one(kind, name)["spec"]["template"]["spec"]


def container(kind: str, name: str) -> dict:
    containers = pod_spec(kind, name)["containers"]
    assert len(containers) == 1
    return containers[0]


def soft_shutdown_seconds() -> float:
    from core.queue import make_celery
    from core.settings import Settings

    return float(make_celery(Settings(broker_url="redis://localhost:6379/0")).conf.worker_soft_shutdown_timeout)


@lru_cache
def api_answers(path: str) -> bool:
    """Does the API (embedded mode, a temporary data dir) answer GET ``path`` with 200?"""
    import tempfile

    from fastapi.testclient import TestClient

    from core.settings import Settings
    from service.app import create_app

    with tempfile.TemporaryDirectory() as data, TestClient(create_app(Settings(data_dir=data))) as client:
        return client.get(path).status_code == 200


# --- docker compose --------------------------------------------------------------------------------------------

def test_compose_file_matches_the_compose_specification():
    assert compose_errors(compose()) == []


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d["services"]["api"].update(stop_grace_perod="10s"), "stop_grace_perod"),
    (lambda d: d["services"]["api"].update(ports=8000), "is not of type 'array'"),
    (lambda d: d["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0].update(
        device_id=["1"]), "device_id"),
    (lambda d: d["services"]["redis"]["healthcheck"].update(interval=5), "is not of type 'string'"),
    (lambda d: d.update(volume={}), "volume"),
])
def test_the_compose_schema_rejects_a_broken_file(break_it, expected):
    doc = compose()
    break_it(doc)
    errors = compose_errors(doc)
    assert errors and expected in " ".join(errors), errors


def test_compose_services_volumes_and_dependencies_resolve():
    doc = compose()
    services, volumes = doc["services"], set(doc["volumes"])
    for name, service in services.items():
        for spec in service.get("volumes", []):
            source = spec.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in volumes, f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert "./deploy/redis.conf:/usr/local/etc/redis/redis.conf:ro" in services["redis"]["volumes"]
    conf = dict(line.split(None, 1) for line in (REPO / "deploy/redis.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["appendonly"] == "yes" and conf["maxmemory-policy"] == "noeviction"
    assert "redis-data:/data" in services["redis"]["volumes"] and services["redis"]["healthcheck"]


def test_compose_runs_the_api_on_the_cpu_image_with_a_health_check_on_a_real_route():
    api = compose()["services"]["api"]
    assert api["build"]["dockerfile"] == "Dockerfile"
    command = api["command"]
    assert command[:2] == ["slidesynth", "serve"] and "--no-worker" in command
    assert int(command[command.index("--processes") + 1]) > 1
    from slidesynth.cli import build_parser

    build_parser().parse_args(command[1:])  # the options exist
    probe = " ".join(api["healthcheck"]["test"])
    path = re.search(r"http://127\.0\.0\.1:8000(/\w+)", probe).group(1)
    assert api_answers(path)
    assert any(v.endswith(":/models:ro") for v in api["volumes"])  # weights read-only


def test_compose_has_one_gpu_worker_per_gpu_with_a_grace_period_for_the_soft_shutdown():
    services = compose()["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert "worker-gpu0" in workers
    names, gpus = [], []
    for name, worker in workers.items():
        assert worker["build"]["dockerfile"] == "Dockerfile.gpu"
        command = worker["command"]
        assert command[:2] == ["slidesynth", "worker"]
        names.append(command[command.index("--name") + 1])
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        gpus += device["device_ids"]
        assert name == f"worker-gpu{device['device_ids'][0]}" and names[-1] == f"gpu{device['device_ids'][0]}"
        assert duration_seconds(worker["stop_grace_period"]) >= soft_shutdown_seconds() + 30, name
        assert any(v.endswith(":/models:ro") for v in worker["volumes"])
        assert worker["environment"] == services["api"]["environment"]  # one set of settings for all
    assert len(set(names)) == len(names) and len(set(gpus)) == len(gpus)
    assert "REMAP_SIGTERM=SIGQUIT" in (REPO / "Dockerfile.gpu").read_text()


def test_flower_is_an_optional_profile_behind_basic_auth_from_the_environment():
    doc = compose()
    flower = doc["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    assert flower["build"]["args"]["EXTRAS"] == "[flower]"
    assert "flower" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"  # no password in the file
    script = " ".join(flower["command"])
    assert 'test -n "$$FLOWER_BASIC_AUTH" ||' in script and "exit 2" in script  # refuses to run without it
    assert flower["environment"]["SLIDESYNTH_BROKER_URL"] == doc["x-settings"]["SLIDESYNTH_BROKER_URL"]


# --- Kubernetes ------------------------------------------------------------------------------------------------

def test_kustomize_renders_the_overlay():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed: the overlay is not rendered; the other tests read the base's files")
    docs, how = rendered()
    assert how == "kubectl kustomize"
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget",
                 "ScaledObject", "Service", "ServiceMonitor", "StatefulSet"):
        assert kind in kinds, kind
    images = {c["image"] for d in objects("Deployment") for c in d["spec"]["template"]["spec"]["containers"]}
    assert all(image.startswith("registry.example.com/") for image in images), images
    assert all(d["metadata"].get("namespace") == "slidesynth" for d in docs if d["kind"] != "Namespace")


def test_every_manifest_matches_its_schema():
    docs, how = rendered()
    print(f"manifests from {how}; Kubernetes {K8S_VERSION} schemas (kubernetes-validate, strict), "
          f"CRDs from deploy/schemas/")
    errors = {f"{d['kind']}/{d['metadata']['name']}": k8s_errors(d) for d in docs}
    assert not {k: v for k, v in errors.items() if v}, errors


def _break(kind, name, mutate):
    doc = copy.deepcopy(one(kind, name))
    mutate(doc)
    return doc


@pytest.mark.parametrize("kind, name, mutate, expected", [
    ("Deployment", "slidesynth-worker", lambda d: d["spec"].update(replica=2), "replica"),
    ("Deployment", "slidesynth-api",
     lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="8000"), "integer"),
    ("Deployment", "slidesynth-api", lambda d: d["spec"].pop("selector"), "selector"),
    ("StatefulSet", "slidesynth-redis", lambda d: d["spec"].update(replicas="one"), "integer"),
    ("NetworkPolicy", "slidesynth-redis", lambda d: d["spec"].update(policyType=["Ingress"]), "policyType"),
    ("ScaledObject", "slidesynth-worker", lambda d: d["spec"].update(minReplicas=0), "minReplicas"),
    ("ScaledObject", "slidesynth-worker", lambda d: d["spec"]["triggers"][0].pop("type"), "type"),
    ("ScaledObject", "slidesynth-worker", lambda d: d["spec"]["triggers"][0]["metadata"].update(listLength=1),
     "is not of type 'string'"),
    ("ServiceMonitor", "slidesynth-api", lambda d: d["spec"]["endpoints"][0].update(interval="30 seconds"),
     "does not match"),
])
def test_the_validators_reject_a_broken_manifest(kind, name, mutate, expected):
    errors = k8s_errors(_break(kind, name, mutate))
    assert errors and expected in " ".join(errors), errors


def test_a_kind_without_a_schema_is_an_error_not_a_pass():
    errors = k8s_errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert errors and "Couldn't find schema" in errors[0]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        (labels.get(e["key"]) in e["values"]) == (e["operator"] == "In")
        for e in selector.get("matchExpressions", []))


def test_services_pdbs_and_the_service_monitor_select_the_right_pods():
    pods = {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["metadata"]["labels"]
            for d in objects("Deployment") + objects("StatefulSet")}
    for service in objects("Service"):
        matched = [name for name, labels in pods.items() if _selects({"matchLabels": service["spec"]["selector"]},
                                                                        labels)]
        assert len(matched) == 1, (service["metadata"]["name"], matched)
    for pdb in objects("PodDisruptionBudget"):
        matched = [name for name, labels in pods.items() if _selects(pdb["spec"]["selector"], labels)]
        assert matched == [f"Deployment/{pdb['metadata']['name']}"], matched
    monitor = one("ServiceMonitor", "slidesynth-api")
    api_service = one("Service", "slidesynth-api")
    assert _selects(monitor["spec"]["selector"], api_service["metadata"]["labels"])
    ports = {p["name"] for p in api_service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and api_answers(endpoint["path"])


def test_only_the_api_the_workers_and_keda_reach_redis():
    (policy,) = objects("NetworkPolicy")
    redis_labels = one("StatefulSet", "slidesynth-redis")["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"], redis_labels) and policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    allowed = {name for name, d in (("api", one("Deployment", "slidesynth-api")),
                                    ("worker", one("Deployment", "slidesynth-worker")),
                                    ("redis", one("StatefulSet", "slidesynth-redis")))
               if any("namespaceSelector" not in peer and _selects(peer["podSelector"],
                                                                   d["spec"]["template"]["metadata"]["labels"])
                      for peer in rule["from"])}
    assert allowed == {"api", "worker"}
    other = [peer for peer in rule["from"] if "namespaceSelector" in peer]
    assert other == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
                      "podSelector": {"matchLabels": {"app": "keda-operator"}}}]


def test_redis_is_a_statefulset_with_a_volume_aof_and_noeviction():
    redis = one("StatefulSet", "slidesynth-redis")
    args = container("StatefulSet", "slidesynth-redis")["args"]
    options = dict(zip(args[::2], args[1::2]))
    assert options["--appendonly"] == "yes" and options["--maxmemory-policy"] == "noeviction"
    assert options["--appendfsync"] == "everysec" and options["--dir"] == "/data"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": "data", "mountPath": "/data"} in container("StatefulSet", "slidesynth-redis")["volumeMounts"]
    assert claim["metadata"]["name"] == "data"
    service = one("Service", redis["spec"]["serviceName"])
    broker = configmap_settings()["SLIDESYNTH_BROKER_URL"]
    assert broker == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"


def test_the_api_and_workers_take_the_settings_and_the_secret_and_mount_the_volumes():
    claims = {d["metadata"]["name"] for d in objects("PersistentVolumeClaim")}
    for name in ("slidesynth-api", "slidesynth-worker"):
        spec, main = pod_spec("Deployment", name), container("Deployment", name)
        assert main["envFrom"] == [{"configMapRef": {"name": "slidesynth-config"}},
                                   {"secretRef": {"name": "slidesynth-secrets"}}]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        assert mounts["/models"].get("readOnly") is True and mounts["/data"]
        for mount in mounts.values():
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            assert claim is None or claim["claimName"] in claims
    assert not objects("Secret")  # no secret is committed: created from deploy/k8s/secrets.example.env


def test_api_probes_use_real_routes_and_liveness_does_not_depend_on_redis():
    api = container("Deployment", "slidesynth-api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz" and api_answers("/healthz")
    assert api["livenessProbe"]["httpGet"]["path"] == "/metrics" and api_answers("/metrics")
    assert {p["name"] for p in api["ports"]} >= {api["readinessProbe"]["httpGet"]["port"]}
    from slidesynth.cli import build_parser

    build_parser().parse_args(api["command"][1:])


def test_the_gpu_worker_asks_for_one_gpu_and_has_time_to_give_back_its_job():
    spec, worker = pod_spec("Deployment", "slidesynth-worker"), container("Deployment", "slidesynth-worker")
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["terminationGracePeriodSeconds"] >= soft_shutdown_seconds() + 30
    assert {"name": "REMAP_SIGTERM", "value": "SIGQUIT"} in worker["env"]
    assert worker["command"][:2] == ["slidesynth", "worker"]
    from slidesynth.cli import build_parser

    build_parser().parse_args(worker["command"][1:])
    assert {"name": "metrics", "containerPort": deployed_settings().metrics_port} in worker["ports"]


def test_prometheus_scrapes_every_worker_pod_on_the_port_it_serves():
    """The worker serves its metrics on SLIDESYNTH_METRICS_PORT (core/metrics.py): a headless Service names the
    worker pods' `metrics` port and a ServiceMonitor scrapes it; compose publishes each worker's port on the
    host's loopback, one host port per worker."""
    settings = deployed_settings()
    assert settings.metrics_port > 0 and settings.log_format == "json"
    pods = one("Deployment", "slidesynth-worker")["spec"]["template"]["metadata"]["labels"]
    service = one("Service", "slidesynth-worker-metrics")
    assert service["spec"]["clusterIP"] == "None" and _selects({"matchLabels": service["spec"]["selector"]}, pods)
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container("Deployment", "slidesynth-worker")["ports"]}
    assert port["targetPort"] == "metrics" and container_ports["metrics"] == settings.metrics_port
    monitor = one("ServiceMonitor", "slidesynth-worker")
    assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert not _selects(monitor["spec"]["selector"], one("Service", "slidesynth-api")["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [(port["name"], "/metrics")]
    services = compose()["services"]
    host_ports = []
    for name, worker in services.items():
        if name.startswith("worker-gpu"):
            (published,) = worker["ports"]
            host, host_port, inner = published.split(":")
            assert host == "127.0.0.1" and int(inner) == settings.metrics_port, name
            host_ports.append(host_port)
    assert host_ports and len(set(host_ports)) == len(host_ports)
    assert "ports" not in services["redis"]


def test_keda_scales_the_worker_on_every_queue_the_api_sends_to():
    from core.queue import service_queues

    scaled = one("ScaledObject", "slidesynth-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("Deployment", "slidesynth-worker")["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1  # POST /embed needs a worker
    triggers = scaled["spec"]["triggers"]
    settings = deployed_settings()
    assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(service_queues(settings))
    redis_service = one("Service", "slidesynth-redis")
    namespace = redis_service["metadata"]["namespace"]
    for trigger in triggers:
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        assert set(meta) <= REDIS_TRIGGER_KEYS, set(meta) - REDIS_TRIGGER_KEYS
        # the operator dials from its own namespace: the Service's full name, in the namespace it is rendered in
        assert meta["address"] == (f"{redis_service['metadata']['name']}.{namespace}.svc.cluster.local:"
                                   f"{redis_service['spec']['ports'][0]['port']}")
        assert meta["databaseIndex"] == settings.broker_url.rsplit("/", 1)[1]
        assert int(meta["listLength"]) >= 1
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    names = {t["name"] for t in triggers}
    assert set(re.findall(r"[a-z_]+", formula)) - {"min", "max"} == names


# --- settings --------------------------------------------------------------------------------------------------

def _names_in(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip().split("=", 1)[0] for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def test_every_setting_is_documented_and_set_in_compose_and_kubernetes_or_kept_at_its_default():
    from core.settings import Settings

    readme = (REPO / "README.md").read_text()
    settings = [f"SLIDESYNTH_{name.upper()}" for name in Settings.model_fields]  # read now: new settings count
    in_compose = set(compose()["x-settings"])
    in_k8s = set(configmap_settings()) | set(_names_in(SECRET_KEYS_FILE))
    defaults = _names_in(DEFAULTS_FILE)
    problems = [f"{s}: not in the README" for s in settings if s not in readme]
    for name in settings:
        if name in defaults:
            if name in in_compose or name in in_k8s:
                problems.append(f"{name}: set in a deployment and listed in {DEFAULTS_FILE.name}")
            continue
        missing = [where for where, names in (("docker-compose.yml x-settings", in_compose),
                                              ("deploy/k8s/base/configmap.yaml or secrets.example.env", in_k8s))
                   if name not in names]
        if missing:
            problems.append(f"{name}: not set in {' nor '.join(missing)}; set it there, or list it in "
                            f"deploy/{DEFAULTS_FILE.name} with the reason it keeps its default")
    for name in sorted((in_compose | in_k8s | set(defaults)) - set(settings)):
        problems.append(f"{name}: not a setting of core/settings.py (misspelt, or removed)")
    assert not problems, "\n".join(problems)


def test_compose_and_kubernetes_set_the_same_values():
    in_compose = {k: interpolated_default(v) for k, v in compose()["x-settings"].items()}
    in_k8s = configmap_settings()
    hosts_differ = {"SLIDESYNTH_BROKER_URL"}  # redis://redis:… vs redis://slidesynth-redis:…
    differ = {k: (in_compose[k], in_k8s[k]) for k in set(in_compose) & set(in_k8s) - hosts_differ
              if str(in_compose[k]) != str(in_k8s[k])}
    assert not differ, differ
    # the deployed values are valid settings, and the workers take every queue the API sends to (no --queues)
    deployed_settings()
    for service in compose()["services"].values():
        if service.get("command", [""])[0] == "slidesynth":
            assert service["environment"] is not None and "--queues" not in service["command"]


# --- the API image ---------------------------------------------------------------------------------------------

API_SMOKE = r'''
import io, json, sys, importlib.abc
blocked = set(json.loads(sys.argv[1]))


class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the API image)", name=name)
        return None


sys.meta_path.insert(0, NotInTheImage())
import numpy as np
import tifffile
from PIL import Image
from fastapi.testclient import TestClient

import service
from core.settings import Settings
from service.app import create_app
from slidesynth.cli import build_parser

assert service.__file__.startswith(sys.argv[2]), service.__file__  # the copied folders, not the checkout
build_parser().parse_args(["serve", "--no-worker", "--processes", "2"])
settings = Settings(data_dir=sys.argv[3], models_dir=sys.argv[4], embed_timeout=1)
labels = np.zeros((64, 64), np.uint8)
labels[:, 32:] = 1
png = io.BytesIO()
Image.fromarray(labels).save(png, format="PNG")
tiff = io.BytesIO()
tifffile.imwrite(tiff, labels, compression="zlib")
tile = io.BytesIO()
Image.fromarray(np.full((128, 128, 3), 200, np.uint8)).save(tile, format="PNG")
with TestClient(create_app(settings)) as client:
    assert client.get("/healthz").status_code == 200
    models = client.get("/models").json()
    assert client.get("/encoders").status_code == 200
    ids = []
    for name, data in (("m.png", png.getvalue()), ("m.tiff", tiff.getvalue())):
        r = client.post("/generate", files={"mask": (name, data, "application/octet-stream")},
                        data={"params": json.dumps({"steps": 2, "mask_mpp": 1.0})})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    assert client.get(f"/jobs/{ids[0]}").json()["status"] == "queued"
    assert client.get("/jobs").json()["total"] == 2
    assert client.delete(f"/jobs/{ids[1]}").status_code == 200
    r = client.post("/embed", files={"tiles": ("t.png", tile.getvalue(), "image/png")})
    assert r.status_code in (200, 503), r.text  # no worker runs here: 503 after embed_timeout
    assert client.get("/metrics").status_code == 200
heavy = sorted(m for m in ("torch", "diffusers", "cv2", "triton", "zarr", "safetensors") if m in sys.modules)
assert not heavy, heavy
print("ok", len(models["models"]), "models")
'''


def _api_image_blocked_modules() -> list[str]:
    """Top-level modules of the installed distributions that the API image does not install: everything outside
    the closure of pyproject's base dependencies (with their requested extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed: set[str] = set()
    todo = [(Requirement(r), set(Requirement(r).extras)) for r in base]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, tuple(sorted(extras)))
        if key in allowed:
            continue
        allowed.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((sub, set(sub.extras)))
    allowed_names = {name for name, _ in allowed} | {"slidesynth"}
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if not any(canonicalize_name(d) in allowed_names for d in dists):
            blocked.add(module)
    assert "torch" in blocked and "numpy" not in blocked and "fastapi" not in blocked
    return sorted(blocked - {"_distutils_hack", "__editable___slidesynth_0_1_0_finder"})


def test_the_api_runs_from_its_image_without_the_worker_dependencies(tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    copied = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        match = re.fullmatch(r"COPY (\S+) \./(\S*)", line.strip())
        if match and match.group(1) not in ("pyproject.toml",):
            source = REPO / match.group(1)
            if source.is_dir():
                shutil.copytree(source, app_dir / match.group(2), ignore=shutil.ignore_patterns("__pycache__"))
                copied.append(match.group(1))
    assert {"core", "service", "slidesynth", "models"} <= set(copied) and "worker" not in copied
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env["PYTHONPATH"] = str(app_dir)
    proc = subprocess.run([sys.executable, "-c", API_SMOKE, json.dumps(_api_image_blocked_modules()), str(app_dir),
                           str(tmp_path / "data"), str(REPO / "weights")], cwd=app_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout


# --- worker start checks ---------------------------------------------------------------------------------------

def _worker(tmp_path, *args, **settings) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_DATA_DIR=str(tmp_path / "data"), SLIDESYNTH_MODELS_DIR=str(REPO / "weights"),
               SLIDESYNTH_DEVICE="cpu", PYTHONPATH=str(REPO))
    env.update({f"SLIDESYNTH_{k.upper()}": str(v) for k, v in settings.items()})
    return subprocess.run([sys.executable, "-m", "slidesynth.cli", "worker", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _refused(proc: subprocess.CompletedProcess, setting: str, tmp_path) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "refusing to start" in line]
    assert len(lines) == 1 and lines[0].startswith(f"slidesynth worker: refusing to start: {setting}="), proc.stderr
    assert not list((tmp_path / "data").glob("worker-state*"))  # Celery never started
    return lines[0]


@pytest.mark.parametrize("queues, settings", [
    ("gpu2", {}),
    ("gpu,gpu.embed,gpu.slow", {}),
    ("gpu", {"queue": "slides"}),  # the API sends to `slides` now
    (",", {}),
])
def test_a_worker_refuses_a_queue_the_api_does_not_send_to(tmp_path, queues, settings):
    line = _refused(_worker(tmp_path, "--queues", queues, **settings), "--queues", tmp_path)
    assert ("is not a queue this service sends to" in line and "SLIDESYNTH_QUEUE" in line) or "names no queue" in line


def test_a_worker_refuses_a_models_folder_without_the_default_model(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    line = _refused(_worker(tmp_path, models_dir=empty, default_model="diffinfinite-demo"),
                    "SLIDESYNTH_DEFAULT_MODEL", tmp_path)
    assert "diffinfinite-demo: no such model: no folder diffinfinite-demo/" in line and str(empty) in line
    line = _refused(_worker(tmp_path, models_dir=tmp_path / "not-mounted", default_model="diffinfinite-demo"),
                    "SLIDESYNTH_DEFAULT_MODEL", tmp_path)
    assert "SLIDESYNTH_MODELS_DIR=" in line and "is not a folder (is the weights volume mounted?)" in line
    line = _refused(_worker(tmp_path, default_embedding_model="nope"), "SLIDESYNTH_DEFAULT_EMBEDDING_MODEL", tmp_path)
    assert "nope: no such model" in line


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_worker_refuses_a_device_this_machine_lacks(tmp_path, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    if device == "cuda:3" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    line = _refused(_worker(tmp_path, device=device), "SLIDESYNTH_DEVICE", tmp_path)
    assert f"SLIDESYNTH_DEVICE={device}: " in line


def test_the_start_checks_accept_the_deployments_queues_and_models(tmp_path):
    from core.settings import Settings
    from worker.start_checks import check_deployment, worker_queues

    settings = Settings(data_dir=tmp_path, models_dir=REPO / "weights", queue="gpu", embed_queue="gpu.embed",
                        default_model="diffinfinite-demo", default_embedding_model="infinity-brush-demo")
    assert check_deployment(settings, None) == ["gpu.embed", "gpu.high", "gpu", "gpu.low"]   # polled in this order
    assert worker_queues(settings, " gpu.embed ") == ["gpu.embed"]  # an embed-only worker
    assert worker_queues(Settings(data_dir=tmp_path, queue="q"), "q,q.embed") == ["q", "q.embed"]
    # development: no models folder at all, the built-in untrained defaults
    check_deployment(Settings(data_dir=tmp_path, models_dir=tmp_path / "none"), None)
