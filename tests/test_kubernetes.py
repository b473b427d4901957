"""The Kubernetes deployment (Dockerfile, k8s/), checked offline: nothing here builds an image or reaches a cluster.

The manifests are validated against KubeRay v1.7.0's own CRDs (`../shared/schemas/kuberay-v1.7.0/`, the
`openAPIV3Schema` of version v1). `jsonschema` checks that schema once the `x-kubernetes-*` keys are dropped; the CRDs
leave `additionalProperties` unset, which JSON Schema reads as "anything goes", so the loader closes every object
schema that lists `properties` (as `kubectl apply`'s strict field validation does): a misspelt key is an error here,
as it is for the API server. The other tests keep the image, the entrypoint and the config the RayJob runs in
agreement with the project (requirements.lock, pyproject.toml, configs/).
"""

import copy
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.config_loading import load_config

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = Path(os.environ.get("KUBERAY_SCHEMAS", REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"))
MANIFESTS = {"RayJob": "k8s/rayjob.yaml", "RayCluster": "k8s/raycluster.yaml"}
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName


# --- the schema ---------------------------------------------------------------------------------------------------


def _strict(schema):
    """An OpenAPI v3 schema of a CRD as JSON Schema: `x-kubernetes-*` keys dropped, and every object schema that lists
    its `properties` closed to other keys (unless it says `x-kubernetes-preserve-unknown-fields`)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":  # a map of field name -> schema, not a schema itself
            result[key] = {name: _strict(field) for name, field in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            result[key] = _strict(value)
        else:
            result[key] = value
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            result["additionalProperties"] = False
    return result


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(kind: str, manifest: dict) -> list[str]:
    errors = crd_validator(kind).iter_errors(manifest)
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors]


@pytest.fixture(autouse=True, scope="module")
def _schemas_present():
    if not (SCHEMAS / CRDS["RayJob"]).is_file():
        pytest.skip(f"KubeRay's CRDs are not at {SCHEMAS} (set KUBERAY_SCHEMAS)")


# --- the project ----------------------------------------------------------------------------------------------------


def manifest(kind: str) -> dict:
    document = yaml.safe_load((REPO / MANIFESTS[kind]).read_text())
    assert document["apiVersion"] == "ray.io/v1" and document["kind"] == kind
    return document


def cluster_spec(kind: str) -> dict:
    document = manifest(kind)
    return document["spec"]["rayClusterSpec"] if kind == "RayJob" else document["spec"]


def ray_pod_specs(kind: str) -> dict[str, dict]:
    """Pod spec of the head ("head") and of each worker group (by group name)."""
    spec = cluster_spec(kind)
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({group["groupName"]: group["template"]["spec"] for group in spec["workerGroupSpecs"]})
    return pods


def locked_version(package: str) -> str:
    (version,) = re.findall(rf"^{re.escape(package)}==(\S+)$", (REPO / "requirements.lock").read_text(), re.M)
    return version


def locked_python() -> str:
    """The Python the lock was made with, from its header ("(Python 3.11, Linux x86-64)")."""
    (version,) = re.findall(r"\(Python (\d+\.\d+)\b", (REPO / "requirements.lock").read_text())
    return version


def project_version() -> str:
    """[project] version of pyproject.toml (read without tomllib, which Python 3.10 lacks)."""
    project = (REPO / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
    (version,) = re.findall(r'^version\s*=\s*"([^"]+)"', project, re.M)
    return version


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def dockerfile_workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)$", dockerfile(), re.M)
    return workdir


def wants_gpu(pod: dict) -> bool:
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in pod["containers"])


# --- schema -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_passes_kuberays_schema(kind):
    assert schema_errors(kind, manifest(kind)) == []


def _set(document: dict, path: str, value) -> dict:
    document = copy.deepcopy(document)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = document
    for part in parents:
        node = node[part]
    node[last] = value
    return document


def _rename(document: dict, path: str, new_key: str) -> dict:
    document = copy.deepcopy(document)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = document
    for part in parents:
        node = node[part]
    node[new_key] = node.pop(last)
    return document


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda m: _rename(m, "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"), id="typo-top"),
        pytest.param(
            lambda m: _rename(m, "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.image", "imagee"),
            id="typo-in-pod-template",
        ),
        pytest.param(lambda m: _set(m, "spec.shutdownAfterJobFinishes", "yes"), id="string-for-bool"),
        pytest.param(lambda m: _set(m, "spec.rayClusterSpec.workerGroupSpecs.0.replicas", "one"), id="string-for-int"),
        pytest.param(lambda m: _set(m, "spec.rayClusterSpec.authOptions.mode", "tokens"), id="not-in-enum"),
        pytest.param(
            lambda m: _set(m, "spec.rayClusterSpec.headGroupSpec.rayStartParams", {"num-cpus": 0}),
            id="int-for-string-param",
        ),
        pytest.param(
            lambda m: _set(
                m, "spec.rayClusterSpec.workerGroupSpecs.1.template.spec.containers.0.resources.limits.cpu", "six cores"
            ),
            id="bad-quantity",
        ),
        pytest.param(
            lambda m: _set(m, "spec.rayClusterSpec.workerGroupSpecs.0", {"groupName": "cpu", "rayStartParams": {}}),
            id="missing-required",
        ),
    ],
)
def test_schema_rejects_a_broken_rayjob(broken):
    assert schema_errors("RayJob", broken(manifest("RayJob")))


def test_schema_rejects_a_typo_in_a_raycluster():
    broken = _rename(manifest("RayCluster"), "spec.workerGroupSpecs.0.maxReplicas", "maxReplica")
    errors = schema_errors("RayCluster", broken)
    assert any("maxReplica" in error for error in errors) and any("maxReplicas" in error for error in errors)


# --- image ----------------------------------------------------------------------------------------------------------


def test_dockerfile_starts_from_rays_image_of_the_lock():
    text = dockerfile()
    python = locked_python().replace(".", "")
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert base == f"rayproject/ray:{locked_version('ray')}-py{python}${{VARIANT}}"
    # the variant: "" (Ray's CPU image, the default) or "-gpu" (its CUDA image)
    assert re.search(r'^ARG VARIANT=""$', text.split("FROM")[0], re.M)
    assert re.search(r'^ARG VARIANT=""$', text.split("FROM", 1)[1], re.M)  # declared again for the RUN below
    assert '"$VARIANT" = "-gpu"' in text and "--build-arg VARIANT=-gpu" in text


def test_dockerfile_installs_the_locked_versions_then_the_project_without_dependencies():
    text = dockerfile()
    lock = text.index("pip install --no-cache-dir -r requirements.lock")
    project = text.index("pip install --no-cache-dir --no-deps .")
    assert lock < project
    # the GPU variant's CUDA wheels come from the locked tensorflow's own pins, never a second version of it
    assert "tensorflow[and-cuda]==$(sed -n 's/^tensorflow==//p' requirements.lock)" in text
    assert "python -m pipeline config --config configs/kubernetes.yaml" in text  # the shipped config loads in the image
    assert dockerfile_workdir() == "/home/ray/mnist-pipeline"


def test_dockerignore_keeps_local_state_out_and_the_configs_in():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert {".venv", "runs", ".git"} <= set(ignored)
    assert not any(line.startswith(("configs", "pipeline", "stages", "requirements", "pyproject")) for line in ignored)


@pytest.mark.parametrize("kind", MANIFESTS)
def test_images_are_the_projects_version_and_gpu_groups_get_the_gpu_variant(kind):
    version = project_version()
    for group, pod in ray_pod_specs(kind).items():
        for container in pod["containers"]:
            repository, tag = container["image"].rsplit(":", 1)
            assert repository.endswith("/mnist-pipeline"), (group, container["image"])
            assert tag == (f"{version}-gpu" if wants_gpu(pod) else version), (group, container["image"])
    assert cluster_spec(kind)["rayVersion"] == locked_version("ray")


def test_the_interactive_cluster_is_the_rayjobs_cluster():
    assert cluster_spec("RayCluster") == cluster_spec("RayJob")


# --- what the RayJob runs -------------------------------------------------------------------------------------------


def entrypoint() -> tuple[Path, list[str]]:
    """The config file (in the repository) and the --set overrides of the RayJob's entrypoint."""
    words = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "pipeline", "run"], words
    options = words[4:]
    assert options[0] == "--config" and len(options) % 2 == 0, options
    pairs = list(zip(options[::2], options[1::2]))
    assert {flag for flag, _ in pairs} <= {"--config", "--set"}, options
    config = pairs[0][1]
    prefix = dockerfile_workdir() + "/"
    assert config.startswith(prefix), f"{config} is not in the image's copy of the project ({prefix})"
    return REPO / config.removeprefix(prefix), [value for flag, value in pairs[1:]]


def test_entrypoint_runs_the_pipeline_with_a_shipped_config_on_object_storage():
    path, overrides = entrypoint()
    assert path.is_file(), path
    config = load_config(path, overrides)
    assert config.run.root.startswith("s3://")  # pods share nothing else
    spec = manifest("RayJob")["spec"]
    assert spec.get("entrypointNumCpus", 0) == 0 and not spec.get("entrypointNumGpus")  # the driver stays on the head


def test_the_shipped_config_loads_from_the_command_line_and_comments_every_setting():
    path, _ = entrypoint()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "config", "--config", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["run"]["root"].startswith("s3://")
    for number, line in enumerate(path.read_text().splitlines(), 1):  # the rule of tests/test_config.py
        if re.match(r"^\s*[A-Za-z_]+: *[^\s#]", line) or re.match(r"^\s*- ", line):
            assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


def test_trials_fit_the_gpu_workers():
    path, overrides = entrypoint()
    train = load_config(path, overrides).train
    gpu_pods = [pod for pod in ray_pod_specs("RayJob").values() if wants_gpu(pod)]
    assert gpu_pods and train.gpus_per_trial > 0
    for pod in gpu_pods:
        limits = pod["containers"][0]["resources"]["limits"]
        assert train.cpus_per_trial <= float(limits["cpu"]) and train.gpus_per_trial <= float(limits["nvidia.com/gpu"])


# --- cluster shape --------------------------------------------------------------------------------------------------


def test_rayjob_shuts_its_cluster_down_and_is_bounded():
    spec = manifest("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0


@pytest.mark.parametrize("kind", MANIFESTS)
def test_head_runs_no_trials_and_there_are_cpu_and_gpu_worker_groups(kind):
    spec = cluster_spec(kind)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert not wants_gpu(spec["headGroupSpec"]["template"]["spec"])
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    gpu = [name for name, group in groups.items() if wants_gpu(group["template"]["spec"])]
    cpu = [name for name, group in groups.items() if not wants_gpu(group["template"]["spec"])]
    assert gpu and cpu, groups.keys()
    for group in groups.values():
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1


@pytest.mark.parametrize("kind", MANIFESTS)
def test_every_ray_container_sets_requests_and_limits(kind):
    for group, pod in ray_pod_specs(kind).items():
        for container in pod["containers"]:
            resources = container["resources"]
            for key in ("cpu", "memory"):
                assert key in resources["requests"] and key in resources["limits"], (group, key)
            assert resources["requests"] == resources["limits"], group  # Ray sizes itself from the limits
            if "nvidia.com/gpu" in resources["limits"]:
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


@pytest.mark.parametrize("kind", MANIFESTS)
def test_every_pod_reaches_the_run_root_the_same_way(kind):
    """Nodes share nothing but the run root: every Ray container gets the same storage credentials."""
    sources = [
        (container.get("env"), container.get("envFrom"))
        for pod in ray_pod_specs(kind).values()
        for container in pod["containers"]
    ]
    assert all(source == sources[0] for source in sources), sources


# --- authentication and secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MANIFESTS)
def test_token_authentication_is_on_through_kuberay_with_a_secret_referenced_by_name(kind):
    auth = cluster_spec(kind)["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    assert not auth.get("enableK8sTokenAuth")  # unsupported by KubeRay for RayJob
    # nothing overrides what KubeRay injects into every Ray container (RAY_AUTH_MODE, RAY_AUTH_TOKEN)
    for pod in ray_pod_specs(kind).values():
        for container in pod["containers"]:
            names = {variable["name"] for variable in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}


def _walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}.{index}")
    else:
        yield path, node


@pytest.mark.parametrize("kind", MANIFESTS)
def test_no_secret_value_is_written_in_a_manifest(kind):
    document = manifest(kind)
    assert document["kind"] != "Secret"
    for path, value in _walk(document):
        assert not re.search(r"(?i)(token|secret|password|access_key)$", path.split(".")[-1]) or path.endswith(
            ("secretName", "secretRef.name")
        ), path
        if isinstance(value, str):
            assert not re.search(r"\b[0-9a-f]{32,}\b|AKIA[0-9A-Z]{16}", value), path  # a token or an AWS key id
    for pod in ray_pod_specs(kind).values():
        for container in pod["containers"]:
            for variable in container.get("env", []):
                if re.search(r"(?i)token|secret|password|key", variable["name"]):
                    assert "valueFrom" in variable and "value" not in variable, variable["name"]


def test_readme_creates_the_token_secret_the_manifests_name():
    readme = (REPO / "README.md").read_text()
    (secret,) = {cluster_spec(kind)["authOptions"]["secretName"] for kind in MANIFESTS}
    assert f"kubectl create secret generic {secret}" in readme
    assert f"--from-literal={TOKEN_SECRET_KEY}=" in readme


# --- the project's YAML convention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS.values())
def test_every_manifest_setting_carries_a_comment(name):
    for number, line in enumerate((REPO / name).read_text().splitlines(), 1):
        stripped = line.strip()
        is_section = stripped.endswith(":")  # a mapping header; its settings carry the comments
        if stripped and not stripped.startswith(("#", "- ")) and not is_section:
            assert "#" in line, f"{name}:{number} has no comment: {line!r}"
