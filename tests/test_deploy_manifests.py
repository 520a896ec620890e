"""deploy/kubernetes: every overlay renders offline (`kubectl kustomize`), its core objects pass
Kubernetes' own schemas (kubernetes-validate, strict: no unknown fields), its KServe objects have
the shape of KServe's CRDs, and the pieces agree with each other and with Kiln: the front end's
kiln.toml is a valid configuration that finds the workers through the headless Service, the
workers' arguments are ones `kiln worker` accepts, the probes ask grpc.health.v1 on the h2c port.

A real cluster (KServe's controller, GPUs, the metrics adapter) is not exercised here.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from engine.worker.main import build_parser
from server.config import ConfigError, parse_config
from tests._server import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "raw-cpu")
K8S_VERSION = "1.30.0"
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}
WORKER_PORT = 9000
TOKEN = "a-worker-token-for-the-manifest-test"


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"].startswith(name))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_of(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


# A KServe object's shape: the fields of serving.kserve.io's ServingRuntimeSpec and
# InferenceService predictor that Kiln uses, with their types and KServe's enums. Containers are
# checked separately, as Pod containers, against Kubernetes' own schema.
CONTAINER_LIST = {"type": "array", "minItems": 1, "items": {"type": "object"}}
SERVING_RUNTIME = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
        "spec": {
            "type": "object",
            "required": ["containers", "supportedModelFormats"],
            "additionalProperties": False,
            "properties": {
                "supportedModelFormats": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "version": {"type": "string"},
                            "autoSelect": {"type": "boolean"},
                            "priority": {"type": "integer", "minimum": 1},
                        },
                    },
                },
                "protocolVersions": {"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
                "multiModel": {"type": "boolean"},
                "disabled": {"type": "boolean"},
                "grpcEndpoint": {"type": "string", "pattern": "^port:[0-9]+$"},
                "grpcDataEndpoint": {"type": "string", "pattern": "^port:[0-9]+$"},
                "httpDataEndpoint": {"type": "string"},
                "containers": CONTAINER_LIST,
                "volumes": {"type": "array"},
                "nodeSelector": {"type": "object"},
                "tolerations": {"type": "array"},
                "affinity": {"type": "object"},
                "annotations": {"type": "object"},
                "labels": {"type": "object"},
            },
        },
    },
}
INFERENCE_SERVICE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "metadata": {
            "type": "object",
            "properties": {
                "annotations": {
                    "type": "object",
                    "properties": {"serving.kserve.io/deploymentMode": {"enum": ["Serverless", "RawDeployment", "ModelMesh"]}},
                    "additionalProperties": {"type": "string"},
                }
            },
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {
                "predictor": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 0},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        "terminationGracePeriodSeconds": {"type": "integer"},
                        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                        "model": {
                            "type": "object",
                            "required": ["modelFormat"],
                            "properties": {
                                "modelFormat": {
                                    "type": "object",
                                    "required": ["name"],
                                    "additionalProperties": False,
                                    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                                },
                                "runtime": {"type": "string"},
                                "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
                                "storageUri": {"type": "string", "pattern": "^(pvc|s3|gs|https?|oci|hdfs|webhdfs)://"},
                                "ports": {"type": "array"},
                                "resources": {"type": "object"},
                            },
                        },
                    },
                }
            },
        },
    },
}


def test_every_overlay_renders_offline():
    for overlay in OVERLAYS:
        kinds = sorted(o["kind"] for o in render(overlay))
        assert {"Namespace", "Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "Job"} <= set(kinds)


def test_core_objects_pass_the_kubernetes_schemas(rendered):
    _, objects = rendered
    for obj in objects:
        if obj["kind"] in KSERVE_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_kserve_objects_have_the_crd_shape_and_their_containers_pass_as_pod_containers(rendered):
    overlay, objects = rendered
    kserve = [o for o in objects if o["kind"] in KSERVE_KINDS]
    if overlay.startswith("raw"):
        assert kserve == [], "the raw overlays need no KServe"
        return
    runtime, isvc = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    jsonschema.validate(runtime, SERVING_RUNTIME)
    jsonschema.validate(isvc, INFERENCE_SERVICE)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"}, "spec": {"containers": runtime["spec"]["containers"]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "grpc-v2"
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert {f["name"] for f in runtime["spec"]["supportedModelFormats"]} == {model["modelFormat"]["name"]}
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment", "pods visible to DNS"
    target = "cuda" if overlay == "gpu" else "cpu"
    assert model["storageUri"] == f"pvc://kiln-models/kiln-shapes/{target}"


def worker_container(objects: list[dict]) -> tuple[dict, dict[str, str]]:
    """The worker container and the labels its pods carry, whichever component made them."""
    runtimes = [o for o in objects if o["kind"] == "ServingRuntime"]
    if runtimes:
        isvc = one(objects, "InferenceService")
        return runtimes[0]["spec"]["containers"][0], isvc["spec"]["predictor"]["labels"]
    deployment = one(objects, "Deployment", "kiln-worker")
    return pod_of(deployment)["containers"][0], deployment["spec"]["template"]["metadata"]["labels"]


def test_workers_speak_grpc_on_the_h2c_port_with_health_probes_and_the_token(rendered):
    overlay, objects = rendered
    container, labels = worker_container(objects)
    args = build_parser().parse_args(container["args"][1:])  # "worker" is the subcommand
    assert container["args"][0] == "worker" and args.listen == f"0.0.0.0:{WORKER_PORT}"
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("h2c", WORKER_PORT)]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": WORKER_PORT}, f"{probe}: grpc.health.v1 (open without the token)"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "warm-up may take minutes"
    token = next(e for e in container["env"] if e["name"] == "KILN_WORKER_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "kiln-secrets", "key": "worker-token"}
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if overlay == "gpu" else None)
    image = container["image"]
    assert image.endswith(":cuda" if overlay == "gpu" else ":cpu")

    # The headless Service lists exactly these pods, on this port.
    service = one(objects, "Service", "kiln-worker")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["port"] == WORKER_PORT and service["spec"]["ports"][0]["name"] == "h2c"
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_front_ends_kiln_toml_is_valid_and_finds_the_workers_through_the_headless_service(rendered):
    _, objects = rendered
    config_map = one(objects, "ConfigMap", "kiln-frontend-config")
    raw = tomllib.loads(config_map["data"]["kiln.toml"])
    config = parse_config(raw, env={"KILN_API_KEYS": "key-0123456789", "KILN_WORKER_TOKEN": TOKEN})
    service = one(objects, "Service", "kiln-worker")
    assert config.workers.local == 0
    assert config.workers.remote == [f"dns:///{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"]

    deployment = one(objects, "Deployment", "kiln-frontend")
    pod = pod_of(deployment)
    container = pod["containers"][0]
    assert container["args"] == ["serve", "--config", "/etc/kiln/kiln.toml"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"], "the generated (hashed) name"
    images_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config.images.dir)
    claim = one(objects, "PersistentVolumeClaim", volumes[images_mount["name"]]["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "hosted images shared by every front-end replica"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env == {"KILN_API_KEYS": {"name": "kiln-secrets", "key": "api-keys"},
                   "KILN_WORKER_TOKEN": {"name": "kiln-secrets", "key": "worker-token"}}


def test_the_secrets_placeholders_are_refused_at_start_up(rendered):
    _, objects = rendered
    secret = one(objects, "Secret", "kiln-secrets")["stringData"]
    raw = tomllib.loads(one(objects, "ConfigMap", "kiln-frontend-config")["data"]["kiln.toml"])
    with pytest.raises(ConfigError, match="token"):
        parse_config(raw, env={"KILN_API_KEYS": "key-0123456789", "KILN_WORKER_TOKEN": secret["worker-token"]})
    with pytest.raises(ConfigError):
        parse_config(raw, env={"KILN_API_KEYS": secret["api-keys"], "KILN_WORKER_TOKEN": TOKEN})


def test_every_pod_runs_as_non_root(rendered):
    _, objects = rendered
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            assert pod_of(obj)["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        if obj["kind"] == "ServingRuntime":
            assert obj["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] is True


def test_the_worker_hpa_scales_on_the_front_ends_queue_depth():
    objects = render("raw-cpu")
    hpa = one(objects, "HorizontalPodAutoscaler", "kiln-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment", "kiln-worker")["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["external"]
    assert metric["target"]["type"] == "AverageValue"
    assert f'"{metric["metric"]["name"]}"' in (ROOT / "server" / "metrics.py").read_text(), "a metric kiln serve exports"


def test_the_export_job_builds_the_package_the_workers_load(rendered):
    overlay, objects = rendered
    job = one(objects, "Job", "kiln-export")
    container = pod_of(job)["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TARGET"] == ("cuda" if overlay == "gpu" else "cpu") and env["NAME"] == "kiln-shapes"
    mount = container["volumeMounts"][0]["mountPath"]
    assert f"--out {mount}" in container["args"][0]
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", "exported on the workers' GPU type"
