"""cluster.yaml through Ray's own autoscaler validation (what `ray up` runs before touching AWS), our deployment
rules on top, and the KubeRay fields of deploy/rayjob.yaml and deploy/rayservice.yaml."""
from __future__ import annotations

import copy
import os

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"

# Field names of KubeRay's Go types (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go), so that a
# misspelt key, which the API server would drop silently, fails here.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "suspend", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts"}


def load_cluster() -> dict:
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def ray_up_checks(config: dict) -> dict:
    """The provider-independent part of `ray up`'s _bootstrap_config: defaults merged, then schema + rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    prepared = ray_up_checks(load_cluster())
    assert prepared["provider"]["type"] == "aws"
    # Our own commands replaced the AWS defaults' (which would pip-install a Ray nightly wheel on every node).
    assert not any("ray-wheels" in c for c in prepared["head_setup_commands"] + prepared["worker_setup_commands"])


def _misspell_key(c: dict) -> None:
    c["max_wokers"] = c.pop("max_workers")


def _undefined_head(c: dict) -> None:
    c["head_node_type"] = "no_such_type"


def _bad_resources(c: dict) -> None:
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"


def _too_many_min_workers(c: dict) -> None:
    for node in c["available_node_types"].values():
        node["min_workers"] = c["max_workers"]


@pytest.mark.parametrize("breakage, message", [
    (_misspell_key, "'max_wokers' was unexpected"),
    (_undefined_head, "must be one of `available_node_types`"),
    (_bad_resources, "'one' is not of type 'integer'"),
    (_too_many_min_workers, "smaller than the sum of `min_workers`"),
])
def test_broken_copies_fail_validation(breakage, message):
    config = load_cluster()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        ray_up_checks(config)


def test_cluster_yaml_deployment_rules():
    config = load_cluster()
    docker = config["docker"]
    images = [docker["image"]] + [docker[k] for k in ("head_image", "worker_image") if k in docker]
    assert images and all(i == IMAGE for i in images), f"image tags must be {IMAGE}"

    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu and all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in gpu)
    assert cpu and all(t.get("min_workers", 0) <= 1 and t["max_workers"] >= 1 for t in cpu)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu)
    # Workers read and write S3: each has an instance profile (the head gets Ray's default one).
    assert all("Arn" in t["node_config"]["IamInstanceProfile"] for t in workers.values())

    # The project is installed on every node from the repository copied there.
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any("pip install" in c and f"-e {mounted[0]}" in c for c in config["setup_commands"])
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert f'"ray[data,train,serve]=={ray.__version__}"' in f.read()


def load_rayjob() -> dict:
    with open(os.path.join(ROOT, "deploy", "rayjob.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


def test_rayjob_has_kuberay_fields():
    job = load_rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["entrypoint"].startswith("python -m jobs.pipeline ")
    assert "--workdir s3://" in spec["entrypoint"] and "--catalog s3://" in spec["entrypoint"]
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string inside the YAML: must parse too

    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = cluster["workerGroupSpecs"]
    assert all(set(g) <= WORKER_GROUP_FIELDS for g in groups)
    pods = [head["template"]] + [g["template"] for g in groups]
    images = [c["image"] for p in pods for c in p["spec"]["containers"]]
    assert images and all(i == IMAGE for i in images)

    def gpus(group: dict) -> int:
        containers = group["template"]["spec"]["containers"]
        return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers)

    gpu_groups = [g for g in groups if gpus(g) >= 1]
    assert gpu_groups and all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu_groups)
    assert any(gpus(g) == 0 for g in groups)


def test_rayservice_mirrors_serve_config():
    with open(os.path.join(ROOT, "deploy", "rayservice.yaml")) as f:
        service = yaml.safe_load(f)
    with open(os.path.join(ROOT, "serve", "config.yaml")) as f:
        local = yaml.safe_load(f)["applications"][0]
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == local["import_path"]
    assert set(app["args"]) == set(local["args"]) and app["args"]["workdir"].startswith("s3://")
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in local["deployments"]]

    cluster = service["spec"]["rayClusterConfig"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert all(c["image"] == IMAGE for p in pods for c in p["spec"]["containers"])
