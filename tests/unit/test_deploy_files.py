"""The deployment files, checked without Docker, Fly or Kubernetes (none runs here): the
Dockerfile linted by hadolint and installing what ./dev installs, with the same lock;
fly.toml and the KEDA and Kubernetes manifests against schemas written from their
documentation (tests/schemas/), and against each other and the code."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.api import health
from server.api import metrics as metrics_api
from server.board import reads

ROOT = Path(__file__).parents[2]
SCHEMAS = ROOT / "tests" / "schemas"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
DEV = (ROOT / "dev").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
FLY = tomllib.loads((ROOT / "fly.toml").read_text())
NON_ROOT = "10001:10001"
WORKER_GRACE_SECONDS = 30  # worker/runner.py: SIGTERM finishes or gives back within this


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def manifests(name: str) -> dict[str, dict]:
    """The documents of a deploy/ YAML file, by kind."""
    documents = yaml.safe_load_all((ROOT / "deploy" / name).read_text())
    return {document["kind"]: document for document in documents}


def documented(variable: str) -> bool:
    return f"`{variable}`" in CONFIGURATION


# --- Dockerfile ---------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def stages() -> dict[str, str]:
    """Each build stage's name and its instructions."""
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]
    return {part.split()[2]: part for part in parts}


def extras_of(line: str) -> set[str]:
    return set(re.search(r'"\.\[([a-z,]+)\]"', line)[1].split(","))


def dev_extras(variable: str) -> set[str]:
    return set(re.search(rf'^{variable}="([a-z,]+)"', DEV, re.MULTILINE)[1].split(","))


def test_the_images_install_what_dev_installs_with_the_same_lock():
    assert '"$VENV/bin/pip" install -q -c deploy/constraints.txt -e ".[$EXTRAS]"' in DEV
    installs = [
        line for line in DOCKERFILE.splitlines() if line.startswith("RUN /opt/venv/bin/pip install")
    ]
    assert len(installs) == 4
    for line in installs:
        if "whisperx" in extras_of(line):  # ./dev's whisperx venv: whisperx's own pins
            assert extras_of(line) <= dev_extras("WHISPERX_EXTRAS")
            assert "-c " not in line
        else:
            assert extras_of(line) <= dev_extras("EXTRAS")
            assert "-c deploy/constraints.txt" in line


def load_lock_module():
    spec = importlib.util.spec_from_file_location("lock", ROOT / "deploy" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_pins_every_dependency_at_the_version_tested_here():
    lines = (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if not line.startswith("#"))
    needed = load_lock_module().needed("scribefarm", ("server", "worker", "models"))
    stale = {
        name: (pins.get(name), metadata.version(name))
        for name in needed
        if pins.get(name) != metadata.version(name)
    }
    assert stale == {}, "run `.venv/bin/python deploy/lock.py` after `./dev test`"


@pytest.mark.parametrize("build", ["farm-build", "worker-build", "whisperx-build"])
def test_every_worker_image_has_the_voice_encoder_dev_installs(build):
    encoder = re.search(r'^VOICE_ENCODER="([^"]+)"', DEV, re.MULTILINE)[1]
    assert f"pip install --no-cache-dir --no-deps {encoder}" in stages()[build]


@pytest.mark.parametrize("target", ["server", "farm", "worker", "worker-whisperx"])
def test_every_image_runs_as_a_non_root_user(target):
    stage = stages()[target]
    assert f"USER {NON_ROOT}" in stage
    assert stage.index(f"USER {NON_ROOT}") < stage.index("CMD ")


def test_the_gpu_worker_runs_on_cuda_12_with_cudnn_9():
    base = stages()["cuda-python"].split()[0]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)


# --- fly.toml -----------------------------------------------------------------------


def test_fly_toml_has_only_documented_keys():
    jsonschema.validate(FLY, schema("fly-toml.schema.json"))


def test_fly_toml_rejects_what_the_schema_should():
    for broken in ({**FLY, "kill_timeut": 40}, {**FLY, "restart": [{"policy": "sometimes"}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema("fly-toml.schema.json"))


def test_fly_toml_runs_an_always_on_board_and_workers_that_exit_when_idle():
    groups = set(FLY["processes"])
    assert groups == {"app", "worker"}
    referenced = [
        *FLY["http_service"]["processes"],
        *(
            p
            for section in ("metrics", "restart", "vm")
            for s in FLY[section]
            for p in s["processes"]
        ),
        *(p for check in FLY["checks"].values() for p in check["processes"]),
    ]
    assert set(referenced) <= groups
    assert FLY["http_service"]["processes"] == ["app"]  # workers have no public service
    assert FLY["http_service"]["min_machines_running"] >= 1
    assert FLY["processes"]["worker"].startswith("scribefarm worker")
    assert FLY["env"]["SCRIBEFARM_EXIT_WHEN_IDLE"]
    assert FLY["env"]["SCRIBEFARM_AUTOSCALER"] == "fly"
    restart = {tuple(r["processes"]): r["policy"] for r in FLY["restart"]}
    assert restart[("worker",)] == "on-failure"
    assert FLY["kill_timeout"] > WORKER_GRACE_SECONDS
    assert f"AS {FLY['build']['build-target']}\n" in DOCKERFILE


def test_fly_toml_checks_and_scrapes_routes_the_board_serves():
    port = FLY["http_service"]["internal_port"]
    routes = {route.path for route in [*health.router.routes, *metrics_api.router.routes]}
    paths = [check["path"] for check in FLY["http_service"]["checks"]]
    paths += [check["path"] for check in FLY["checks"].values()]
    paths += [m["path"] for m in FLY["metrics"]]
    assert set(paths) <= routes and "/metrics" in paths
    assert {m["port"] for m in FLY["metrics"]} | {c["port"] for c in FLY["checks"].values()} == {
        port
    }
    assert f"--port {port}" in FLY["processes"]["app"]


def test_fly_toml_sets_only_documented_settings_and_no_secrets():
    names = FLY["env"]
    assert [name for name in names if not documented(name)] == []
    secrets = {"DATABASE_URL", "FLY_API_TOKEN", "SCRIBEFARM_KEY", "SCRIBEFARM_SIGNING_KEY"}
    assert not (set(names) & secrets)
    assert not [name for name in names if name.startswith("AWS_") or "SECRET" in name]


# --- Kubernetes: KEDA and the worker Deployment ---------------------------------------


def test_keda_manifests_follow_keda_schemas():
    documents = manifests("keda-scaledobject.yaml")
    assert set(documents) == {"ScaledObject", "TriggerAuthentication"}
    for document in documents.values():
        jsonschema.validate(document, schema("keda.schema.json"))


def test_the_keda_schema_refuses_a_bare_number_in_trigger_metadata():
    scaled = manifests("keda-scaledobject.yaml")["ScaledObject"]
    scaled["spec"]["triggers"][0]["metadata"]["targetQueryValue"] = 6000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, schema("keda.schema.json"))


def normalised(sql: str) -> str:
    return " ".join(sql.split())


def test_keda_scales_the_worker_deployment_from_zero_on_the_boards_queue_query():
    keda = manifests("keda-scaledobject.yaml")
    deployment = manifests("worker-deployment.yaml")["Deployment"]
    spec = keda["ScaledObject"]["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["minReplicaCount"] == 0
    [trigger] = spec["triggers"]
    assert trigger["type"] == "postgresql"
    assert normalised(trigger["metadata"]["query"]) == normalised(reads.KEDA_QUEUE_DEPTH)
    assert trigger["authenticationRef"]["name"] == keda["TriggerAuthentication"]["metadata"]["name"]


def test_the_worker_deployment_follows_the_kubernetes_schema():
    jsonschema.validate(
        manifests("worker-deployment.yaml")["Deployment"], schema("deployment.schema.json")
    )


def test_the_worker_deployment_runs_a_gpu_worker_that_stops_gracefully():
    deployment = manifests("worker-deployment.yaml")["Deployment"]
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > WORKER_GRACE_SECONDS
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == (
        NON_ROOT
    )
    [container] = pod["containers"]
    assert container["args"][:2] == ["scribefarm", "worker"]
    assert "--exit-when-idle" not in container["args"]  # a Deployment would restart it
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    names = [variable["name"] for variable in container["env"]]
    assert [name for name in names if not documented(name)] == []
    key = next(v for v in container["env"] if v["name"] == "SCRIBEFARM_KEY")
    assert "valueFrom" in key  # from a Secret, never in the manifest
