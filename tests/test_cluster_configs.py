"""The cluster launcher YAMLs, KubeRay manifests and example configs parse, validate, and name only
files that exist in the repository."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from btrm.config import TrainConfig, load_yaml
from btrm.deepspeed_configs import SHIPPED
from conftest import REPO

LAUNCHER_CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))
LAUNCHER_CONFIGS = [p for p in LAUNCHER_CONFIGS if not p.name.startswith("kuberay-")]
TRACKERS = {c for f in dataclasses.fields(TrainConfig) if f.name == "report_to" for c in f.metadata["choices"]} - {"none"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_cluster_launcher_configs_match_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    for local in config.get("file_mounts", {}).values():
        assert (REPO / local).exists(), local
    commands = " ".join(config["setup_commands"])
    assert "./setup.sh" in commands and (REPO / "setup.sh").is_file()
    # Every tracker --report_to offers is installed on the nodes (else the job stops: "not installed").
    [extras] = re.findall(r"\./setup\.sh (\S+)", commands)
    assert set(extras.split(",")) >= TRACKERS


def test_the_kuberay_image_installs_every_tracker():
    [extras] = re.findall(r'pip install .*-e "\.\[([^\]]+)\]"', (REPO / "cluster" / "Dockerfile").read_text())
    assert set(extras.split(",")) >= TRACKERS


def _train_flags(entrypoint: str) -> dict[str, str]:
    words = shlex.split(entrypoint)
    return {w[2:]: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}


def test_kuberay_rayjob_runs_a_real_entry_point_with_valid_options():
    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    entrypoint = job["spec"]["entrypoint"]
    script = re.search(r"/app/(\S+\.py)", entrypoint).group(1)
    assert (REPO / script).is_file()
    flags = _train_flags(entrypoint)
    TrainConfig(**{k: v for k, v in flags.items()})  # every flag is an option of the training job
    assert flags["deepspeed"] in SHIPPED
    # Every pod's /dev/shm is memory (Kubernetes gives 64 MB: NCCL within a pod and Ray's object store need more).
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        shm = [m["name"] for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert [v["emptyDir"]["medium"] for v in pod["volumes"] if v["name"] in shm] == ["Memory"]


def test_kuberay_rayservice_serves_the_repositorys_application():
    service = yaml.safe_load((REPO / "cluster" / "kuberay-rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    # Serve takes a directory already on the nodes only as local://; file:// must name an archive.
    assert serve_config["applications"][0]["runtime_env"]["working_dir"].startswith("local://")
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    for app in (serve_config["applications"][0], local["applications"][0]):
        module, _, attribute = app["import_path"].partition(":")
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()
        assert attribute == "app_builder"
        from btrm.serving import ServiceOptions

        known = {f.name for f in __import__("dataclasses").fields(ServiceOptions)}
        assert set(app["args"]) <= known, set(app["args"]) - known
    # The same deployments with the same settings named (their values may differ: a cluster's scale).
    ours, theirs = serve_config["applications"][0]["deployments"], local["applications"][0]["deployments"]

    def settings(deployment: dict) -> list[str]:  # (autoscaling_config.upscale_delay_s: nested settings too)
        return sorted(name for key, value in deployment.items()
                      for name in ([f"{key}.{inner}" for inner in value] if isinstance(value, dict) else [key]))

    assert [(d["name"], settings(d)) for d in ours] == [(d["name"], settings(d)) for d in theirs]
    assert serve_config["applications"][0]["args"]["require_token"] is True  # its Secret is on every pod
    pods = [service["spec"]["rayClusterConfig"]["headGroupSpec"]] + service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for pod in pods:
        env = [e["name"] for c in pod["template"]["spec"]["containers"] for e in c.get("env", [])]
        assert "BTRM_API_TOKEN" in env


def test_dockerfile_and_shipped_configs_exist():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}" in dockerfile
    assert {p.stem for p in (REPO / "cluster" / "deepspeed").glob("*.json")} == set(SHIPPED)
    for config in (REPO / "configs").glob("*.yaml"):
        values = load_yaml(str(config), TrainConfig)
        for key in ("train_set_path", "eval_set_path"):
            if key in values:
                assert (REPO / values[key]).exists(), (config.name, values[key])
        TrainConfig(**{"train_set_path": "given.parquet", "eval_set_path": "given.parquet", **values}).validate()
    for script in (REPO / "jobs").glob("*.sh"):  # the configs the job scripts name are shipped
        for name in re.findall(r"--config (\S+)", script.read_text()):
            assert (REPO / name).is_file(), (script.name, name)
