"""The Helm chart (helm/imagetag), rendered with real Helm and checked against the app itself.

`helm/render_and_validate.py` renders the default values and every helm/examples/*.yaml with
the Helm Go SDK and validates each object against the Kubernetes schemas offline. These tests
run it, then hold the rendered manifests against the code they deploy: every environment
variable is a Settings field whose value Settings accepts, every probe path is a route of the
real FastAPI app (or the worker's metrics server) answering as a probe needs, ports agree from
container to Service to ServiceMonitor to Ingress, pods are locked down, Redis is reachable only
from the release's own pods, and the bootstrap Job's script really creates the first identity,
idempotently, through `imagetag admin` on a redis-server started with the chart's arguments.
Last, the GPU-production gateway and worker run with the chart's environment on that Redis and
serve a tagging request, within the probes' budgets.

Needs the test extra's helm-python-sdk, kubernetes-validate and
cloudcoil-models-prometheus-operator; nothing is downloaded at test time.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from service.worker_metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / "helm"
CHART = HELM / "imagetag"
SCRIPT = HELM / "render_and_validate.py"
SCHEMA_PATH = CHART / "values.schema.json"

# Variables the chart sets that are not Settings: the Redis password (interpolated into
# IMAGETAG_REDIS_URL), writable homes for the libraries under a read-only root, and the
# bootstrap Job's inputs. Anything else must be IMAGETAG_<a Settings field>.
NON_SETTINGS_ENV = {"REDIS_PASSWORD", "HOME", "YOLO_CONFIG_DIR", "MPLCONFIGDIR",
                    "ADMIN_ACCOUNT", "ADMIN_USER", "ADMIN_PROJECT", "ADMIN_PASSWORD"}
REDIS_CONTAINER_ENV = {"REDIS_PASSWORD", "REDISCLI_AUTH"}
# Settings the chart derives from its own values; `config` may not set them.
CHART_MANAGED = {"host", "port", "tls_certfile", "tls_keyfile", "data_dir", "redis_url", "master_key",
                 "weights_dir", "detector_weights", "classifier_weights", "device", "inference", "metrics_port",
                 "runtime_cache_dir"}
EXAMPLES = ("cpu-small", "gpu-production", "external-redis", "gpu-keda")


def _load_script():
    spec = importlib.util.spec_from_file_location("render_and_validate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rv = _load_script()


# --- renderings -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def renderings() -> dict[str, Any]:
    """The default values and each example, rendered and validated once per test session (CI's
    `.ci/run` renders them with the script before the tests, as a gate of its own)."""
    return {name: rv.render_and_validate(name, values) for name, values in rv.value_sets()}


def render(values: dict[str, Any]):
    rendering = rv.render_and_validate("test", values)
    assert not rendering.errors, "\n".join(rendering.errors)
    return rendering


def workloads(rendering) -> Iterator[tuple[dict, dict]]:
    """(object, pod spec) of every Deployment, StatefulSet and Job."""
    for obj in rendering.objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def deployment(rendering, which: str) -> dict:
    return rendering.get("Deployment", f"imagetag-{which}")


def main_container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def kube_expand(text: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """The kubelet's expansion of env values, commands and args: `$$` is a literal `$`, `$(NAME)`
    the value of a variable defined earlier (left as is when undefined). Also returns every
    `$(...)` it left unexpanded: in a manifest these are mistakes or traps."""
    out: list[str] = []
    unexpanded: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i)) != -1:
            name = text[i + 2 : end]
            if name in env:
                out.append(env[name])
            else:
                out.append(text[i : end + 1])
                unexpanded.append(name)
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out), unexpanded


def resolved_env(container: dict, secrets: dict[tuple[str, str], str] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet builds it: secret references from `secrets`
    (or a stand-in), and $(VAR) expanded only from variables defined earlier in the list."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = kube_expand(str(entry["value"]), env)[0]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            default = "redis://:pw@redis.example:6379/0" if "url" in ref["key"] else f"s3cret-{ref['key']}"
            env[entry["name"]] = (secrets or {}).get((ref["name"], ref["key"]), default)
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("IMAGETAG_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


# --- the render-and-validate step -----------------------------------------------------------

def test_render_and_validate_passes_for_defaults_and_every_example(renderings, monkeypatch, capsys) -> None:
    assert {p.stem for p in rv.example_files()} >= set(EXAMPLES)
    # The script's own report, on the session's renderings rather than a second render.
    monkeypatch.setattr(rv, "render_and_validate", lambda name, values: renderings[name])
    assert rv.main([]) == 0
    out = capsys.readouterr().out
    for name in ("default", *EXAMPLES):
        assert re.search(rf"^ok +{re.escape(name)}: \d+ objects valid for Kubernetes", out, re.M), out


def test_render_and_validate_fails_on_an_invalid_manifest(tmp_path: Path) -> None:
    # The schema lets extraEnv entries through; the Kubernetes schema must catch the bad field.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"gateway": {"extraEnv": [{"name": "X", "valueFrom": {"secretRef": {"name": "s"}}}]}}))
    run = subprocess.run([sys.executable, str(SCRIPT), "--values", str(bad)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL bad" in run.stdout and "invalid for Kubernetes" in run.stdout and "secretRef" in run.stdout


def test_render_and_validate_fails_on_values_the_schema_rejects(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({"config": {"rate_limit_per_second": 5}}))
    run = subprocess.run([sys.executable, str(SCRIPT), "--values", str(bad)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 1 and "values.schema.json rejects" in run.stdout, run.stdout + run.stderr


def test_validator_rejects_unknown_kinds_and_fields() -> None:
    rendering = rv.Rendering("probe", {})
    rendering.objects = [
        {"apiVersion": "example.com/v1", "kind": "Frobnicator", "metadata": {"name": "f"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": "eighty"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "m"},
         "spec": {"selector": {}, "endpoints": [{"port": "http", "pathh": "/metrics"}]}},
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "so"},
         "spec": {"scaleTargetRef": {"name": "w"}, "triggers": [{"type": "redis-streams", "metadata": {}, "authRef": {}}]}},
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "no-triggers"},
         "spec": {"scaleTargetRef": {"name": "w"}}},
        {"apiVersion": "monitoring.coreos.com/v1beta1", "kind": "PrometheusRule", "metadata": {"name": "r"}, "spec": {}},
    ]
    rendering.sources = ["a.yaml", "b.yaml", "c.yaml", "d.yaml", "e.yaml", "f.yaml"]
    problems = "\n".join(rv.validate(rendering))
    assert "Frobnicator" in problems and "no schema" in problems
    assert "Service/s: invalid" in problems
    assert "unknown field spec.endpoints[0].pathh" in problems
    assert "ScaledObject/so: unknown field spec.triggers[0].authRef" in problems
    assert "ScaledObject/no-triggers: invalid ScaledObject" in problems and "triggers" in problems
    assert "PrometheusRule/r: apiVersion" in problems


def test_every_rendering_is_valid(renderings) -> None:
    for name, rendering in renderings.items():
        assert not rendering.errors, f"{name}:\n" + "\n".join(rendering.errors)
        assert rendering.objects, name


# --- environment ----------------------------------------------------------------------------

def test_every_environment_variable_is_a_settings_field(renderings) -> None:
    fields = set(Settings.model_fields)
    for name, rendering in renderings.items():
        for obj, pod in workloads(rendering):
            for container in containers(pod):
                allowed = REDIS_CONTAINER_ENV if component(obj) == "redis" else NON_SETTINGS_ENV
                for entry in container.get("env", []):
                    variable = entry["name"]
                    if variable.startswith("IMAGETAG_"):
                        assert variable.removeprefix("IMAGETAG_").lower() in fields, f"{name}: {variable} is no Setting"
                        assert variable == variable.upper()
                    else:
                        assert variable in allowed, f"{name}/{obj['metadata']['name']}: unexpected {variable}"
                names = [e["name"] for e in container.get("env", [])]
                assert len(names) == len(set(names)), f"{name}: duplicate env in {container['name']}: {names}"


def test_interpolated_variables_are_defined_before_use(renderings) -> None:
    # An undefined $(NAME) reaches the process as is: a URL with "$(REDIS_PASSWORD)" in it, or a
    # shell command substitution that the kubelet would expand if a variable of that name existed.
    for name, rendering in renderings.items():
        for obj, pod in workloads(rendering):
            for container in containers(pod):
                defined: dict[str, str] = {}
                for entry in container.get("env", []):
                    _, unexpanded = kube_expand(str(entry.get("value", "")), defined)
                    assert not unexpanded, f"{name}: {entry['name']} uses $({unexpanded[0]}) before it is defined"
                    defined[entry["name"]] = "x"
                for arg in [*container.get("command", []), *container.get("args", [])]:
                    _, unexpanded = kube_expand(arg, defined)
                    assert not unexpanded, f"{name}: {container['name']}: unescaped $({unexpanded[0]}) (write $$)"


def test_kube_expand_follows_the_kubelet() -> None:
    assert kube_expand("a$(X)b$$(c)$(Y)$", {"X": "1"}) == ("a1b$(c)$(Y)$", ["Y"])


def test_settings_accept_every_imagetag_container_environment(renderings, monkeypatch) -> None:
    for name, rendering in renderings.items():
        for obj, pod in workloads(rendering):
            if component(obj) == "redis":
                continue
            for container in pod["containers"]:
                settings = settings_from(resolved_env(container), monkeypatch)
                assert settings.redis_url and settings.master_key, f"{name}: {container['name']}"
                assert settings.data_dir == Path("/data")


def test_gateway_settings(renderings, monkeypatch) -> None:
    for name, rendering in renderings.items():
        gateway = deployment(rendering, "gateway")
        container = main_container(gateway)
        assert container["command"] == ["imagetag", "serve"]
        settings = settings_from(resolved_env(container), monkeypatch)
        assert settings.host == "0.0.0.0", "a gateway on 127.0.0.1 is unreachable from its Service"
        assert settings.port == container["ports"][0]["containerPort"]
        workers = name in ("gpu-production", "external-redis", "gpu-keda")
        assert settings.inference == ("remote" if workers else "local"), name
        if not workers:
            cache = rendering.values.get("cache", {})
            expected = (Path(cache.get("mountPath", "/cache")) / "weights" if cache.get("enabled")
                        else Path(rendering.values.get("weights", {}).get("mountPath", "/weights")))
            assert settings.detector_weights[0].parent == expected, name


def test_worker_settings(renderings, monkeypatch) -> None:
    worker = deployment(renderings["gpu-production"], "worker")
    container = main_container(worker)
    assert container["command"] == ["imagetag", "worker"]
    settings = settings_from(resolved_env(container), monkeypatch)
    # `imagetag worker` serves /metrics on host:metrics_port; 127.0.0.1 would hide it from probes.
    assert settings.host == "0.0.0.0"
    assert settings.metrics_port == container["ports"][0]["containerPort"] == 9100
    assert settings.device == "cuda"
    assert settings.batch_max_size == 32  # worker.config over config
    assert settings.detector_weights == [Path("/weights/yolo11s.pt")]


def test_config_values_reach_settings(monkeypatch) -> None:
    config = {"log_level": "debug", "log_format": "text", "otel_endpoint": "http://collector:4318",
              "rate_limit_per_s": 2.5, "rate_limit_burst": 7, "rate_limit_fail_open": True,
              "trusted_proxies": ["10.0.0.0/8", "192.168.0.0/16"], "latency_buckets_s": [0.5, 0.1, 1],
              "max_body_bytes": 20971520, "torch_threads": 3, "url_allowed_networks": "127.0.0.1/32"}
    rendering = render({"config": config, "gateway": {"config": {"rate_limit_burst": 9}}})
    settings = settings_from(resolved_env(main_container(deployment(rendering, "gateway"))), monkeypatch)
    assert settings.log_level == "debug" and settings.rate_limit_per_s == 2.5 and settings.rate_limit_fail_open
    assert settings.log_format == "text" and settings.otel_endpoint == "http://collector:4318"
    assert settings.rate_limit_burst == 9  # the gateway's own config wins
    assert settings.trusted_proxies == ["10.0.0.0/8", "192.168.0.0/16"]
    assert settings.latency_buckets_s == [0.1, 0.5, 1.0]
    assert settings.max_body_bytes == 20971520 and settings.torch_threads == 3
    assert settings.url_allowed_networks == ["127.0.0.1/32"]


def test_config_schema_matches_settings() -> None:
    import json

    schema = json.loads(SCHEMA_PATH.read_text())
    config = schema["$defs"]["config"]
    assert config["additionalProperties"] is False
    settings = Settings.model_json_schema(by_alias=False)["properties"]  # by field name, as `config` is
    assert CHART_MANAGED <= set(settings)
    for field, prop in config["properties"].items():
        assert field in settings, f"config.{field} is not a Settings field"
        assert field not in CHART_MANAGED, f"config.{field} is set by the chart itself"
        expected = settings[field]
        for key in ("enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            assert prop.get(key) == expected.get(key), f"config.{field}: {key}"
        if expected.get("type") == "array":
            assert {"type": "array", "items": expected["items"]} in prop["oneOf"], field
        elif "anyOf" in expected:
            assert [a["type"] for a in prop["anyOf"]] == [a["type"] for a in expected["anyOf"]], field
        else:
            assert prop["type"] == expected["type"], field


# --- probes ---------------------------------------------------------------------------------

class StandInInference:
    """The inference client's surface that create_app and the probes use; no models."""

    ready = False

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@pytest.fixture(scope="module")
def gateway_app(tmp_path_factory):
    from service.app import create_app
    from service.assembly import build_components

    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), auth_mode="none", redis_url=None, master_key="k" * 32)
    inference = StandInInference()
    components = build_components(settings, inference=inference)
    yield create_app(components), inference
    asyncio.run(components.backends.close())


class AppClient:
    """GET requests into the ASGI app in this process (no lifespan, so no models load)."""

    def __init__(self, app) -> None:
        self.app = app

    def get(self, path: str):
        import httpx

        async def fetch():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                return await client.get(path)

        return asyncio.run(fetch())


def answers(client: AppClient, path: str) -> int:
    """The status of GET `path`; 404 and 405 mean the app has no such GET route."""
    return client.get(path).status_code


def test_probe_paths_are_routes_of_the_app_and_answer_as_probes_need(renderings, gateway_app) -> None:
    app, inference = gateway_app
    client = AppClient(app)
    assert answers(client, "/no-such-probe") == 404  # what a probe path missing from the app gets
    paths = set()
    for rendering in renderings.values():
        container = main_container(deployment(rendering, "gateway"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            paths.add((probe, container[probe]["httpGet"]["path"]))
    inference.ready = False  # loading: alive, not ready
    for probe, path in paths:
        status = answers(client, path)
        assert status not in (404, 405), f"{probe} {path}: the app has no GET {path}"
        if probe == "livenessProbe":
            assert path == "/healthz" and status == 200, "liveness must not fail while the models load"
        if probe == "readinessProbe":
            assert path == "/readyz" and status == 503, "not ready while the models load"
    inference.ready = True
    for probe, path in paths:
        assert answers(client, path) == 200, f"{probe} {path} once loaded"
    inference.ready = False


def test_startup_probe_covers_model_loading(renderings) -> None:
    for name, rendering in renderings.items():
        gateway = main_container(deployment(rendering, "gateway"))
        local = not any(o["metadata"]["name"] == "imagetag-worker" for o in rendering.of_kind("Deployment"))
        startup = gateway["startupProbe"]
        # Local inference: startup waits on /readyz, so models that never load get the pod restarted;
        # remote: /readyz waits on workers (GPU nodes may take minutes), so only the process is checked.
        assert startup["httpGet"]["path"] == ("/readyz" if local else "/healthz"), name
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert gateway[probe]["httpGet"]["port"] == "http"
    worker = main_container(deployment(renderings["gpu-production"], "worker"))
    assert worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"] >= 300


def test_metrics_paths_exist(renderings, gateway_app) -> None:
    app, _ = gateway_app
    response = AppClient(app).get("/metrics")
    assert response.status_code == 200, "the gateway app serves no GET /metrics"
    assert response.headers["content-type"].startswith("text/plain") and "imagetag_" in response.text
    for monitor in renderings["gpu-production"].of_kind("ServiceMonitor"):
        assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]
    worker = main_container(deployment(renderings["gpu-production"], "worker"))
    assert {worker[p]["httpGet"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {"metrics"}


def test_worker_probes_answer_as_probes_need_on_the_real_worker_server(renderings) -> None:
    """The rendered worker's probe paths against `imagetag worker`'s own HTTP server, in each of
    its states: startup and readiness pass only with the models loaded and Redis answering;
    liveness passes throughout, so that a Redis outage restarts nothing."""
    worker = main_container(deployment(renderings["gpu-production"], "worker"))
    paths = {probe: worker[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = WorkerMetrics()
    metrics.serve("127.0.0.1", port)

    def statuses() -> dict[str, int]:
        answered = {}
        for probe, path in paths.items():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    answered[probe] = response.status
            except urllib.error.HTTPError as error:
                answered[probe] = error.code
        return answered

    assert statuses() == {"startupProbe": 503, "readinessProbe": 503, "livenessProbe": 200}  # loading
    metrics.loaded()
    metrics.up(True)
    assert statuses() == {"startupProbe": 200, "readinessProbe": 200, "livenessProbe": 200}
    metrics.up(False)  # Redis stopped answering
    assert statuses() == {"startupProbe": 503, "readinessProbe": 503, "livenessProbe": 200}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"imagetag_worker_up" in response.read()  # what the ServiceMonitor scrapes


# --- ports and references -------------------------------------------------------------------

def named_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_ports_agree(renderings) -> None:
    defaults = Settings.model_fields
    default = renderings["default"]
    assert main_container(deployment(default, "gateway"))["ports"][0]["containerPort"] == defaults["port"].default
    worker = main_container(deployment(renderings["gpu-production"], "worker"))
    assert worker["ports"][0]["containerPort"] == defaults["metrics_port"].default
    for name, rendering in renderings.items():
        pods = {o["metadata"]["name"]: o["spec"]["template"] for o in rendering.objects if o["kind"] in ("Deployment", "StatefulSet")}
        services = {s["metadata"]["name"]: s for s in rendering.of_kind("Service")}
        for service in services.values():
            backing = [t for t in pods.values() if selects(service["spec"]["selector"], t["metadata"]["labels"])]
            assert len(backing) == 1, f"{name}: Service {service['metadata']['name']} selects {len(backing)} workloads"
            ports = named_ports(backing[0]["spec"]["containers"][0])
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, f"{name}: {service['metadata']['name']} targets {port['targetPort']}"
        for obj, pod in workloads(rendering):
            for container in pod["containers"]:
                ports = named_ports(container)
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    target = container.get(probe, {}).get("httpGet") or container.get(probe, {}).get("tcpSocket")
                    if target:
                        assert target["port"] in ports, f"{name}: {container['name']} {probe} port {target['port']}"
        for ingress in rendering.of_kind("Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    service = services[backend["name"]]
                    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
        for monitor in rendering.of_kind("ServiceMonitor"):
            matched = [s for s in services.values() if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            assert len(matched) == 1, f"{name}: ServiceMonitor {monitor['metadata']['name']} matches {len(matched)} Services"
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}


def test_redis_url_points_at_the_redis_service(renderings, monkeypatch) -> None:
    from urllib.parse import urlsplit

    for name, rendering in renderings.items():
        if name == "external-redis":
            continue
        service = rendering.get("Service", "imagetag-redis")
        redis = rendering.get("StatefulSet", "imagetag-redis")
        secrets = {("imagetag", "redis-password"): "Pw123", ("imagetag-secrets", "redis-password"): "Pw123"}
        url = urlsplit(resolved_env(main_container(deployment(rendering, "gateway")), secrets)["IMAGETAG_REDIS_URL"])
        assert (url.hostname, url.port, url.password) == ("imagetag-redis", service["spec"]["ports"][0]["port"], "Pw123")
        args = main_container(redis)["args"]
        assert args[args.index("--port") + 1] == str(url.port)
        assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"


def test_autoscalers_and_disruption_budgets_target_the_workloads(renderings) -> None:
    for name, rendering in renderings.items():
        deployments = {d["metadata"]["name"]: d for d in rendering.of_kind("Deployment")}
        for hpa in rendering.of_kind("HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]
            assert target["kind"] == "Deployment" and target["name"] in deployments, name
            assert "replicas" not in deployments[target["name"]]["spec"], f"{name}: replicas fight the HPA"
            assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for pdb in rendering.of_kind("PodDisruptionBudget"):
            matched = [d for d in deployments.values() if selects(pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])]
            assert len(matched) == 1, name
    assert {h["metadata"]["name"] for h in renderings["default"].of_kind("HorizontalPodAutoscaler")} == {"imagetag-gateway"}
    production = renderings["gpu-production"]
    worker_hpa = production.get("HorizontalPodAutoscaler", "imagetag-worker")
    assert worker_hpa["spec"]["metrics"][0]["type"] == "External"
    assert not renderings["cpu-small"].of_kind("HorizontalPodAutoscaler")
    assert not renderings["cpu-small"].of_kind("PodDisruptionBudget")  # one replica: a PDB would block drains


# --- security -------------------------------------------------------------------------------

def test_pods_are_locked_down(renderings) -> None:
    for name, rendering in renderings.items():
        for obj, pod in workloads(rendering):
            where = f"{name}/{obj['metadata']['name']}"
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] > 0, where
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert pod["automountServiceAccountToken"] is False, where
            for container in containers(pod):
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["allowPrivilegeEscalation"] is False, where
                assert context.get("privileged", False) is False, where
                assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add"), where
                resources = container["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {container['name']} {kind}"
                mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts or component(obj) == "redis", f"{where}: {container['name']} has no writable /tmp"
            if component(obj) in ("gateway", "worker", "bootstrap"):
                mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
                assert {"/tmp", "/data"} <= mounts, where
                volumes = {v["name"]: v for v in pod["volumes"]}
                for mount in pod["containers"][0]["volumeMounts"]:
                    volume = volumes[mount["name"]]
                    if mount["mountPath"] in ("/tmp", "/data"):
                        assert "emptyDir" in volume, where


def test_worker_gets_a_gpu_on_gpu_nodes_and_gateways_do_not(renderings) -> None:
    production = renderings["gpu-production"]
    worker = deployment(production, "worker")["spec"]["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    gateway = deployment(production, "gateway")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in gateway["containers"][0]["resources"]["limits"]
    assert "initContainers" not in gateway, "remote gateways load no models"
    assert not any(v["name"] == "weights" for v in gateway["volumes"])
    assert not any(o["metadata"]["name"] == "imagetag-worker" for o in renderings["default"].objects)
    cpu_worker = render({"worker": {"enabled": True, "gpu": {"enabled": False}, "device": "cpu"}})
    limits = main_container(deployment(cpu_worker, "worker"))["resources"]["limits"]
    assert not any("gpu" in key for key in limits)


# --- Redis and its NetworkPolicy -------------------------------------------------------------

def test_network_policy_admits_only_gateways_workers_and_the_bootstrap_job(renderings) -> None:
    for name in ("default", "cpu-small", "gpu-production"):
        rendering = renderings[name]
        policy = rendering.get("NetworkPolicy", "imagetag-redis")
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        pods = {obj["metadata"]["name"]: obj["spec"]["template"]["metadata"]["labels"] for obj, _ in workloads(rendering)}
        redis_labels = pods["imagetag-redis"]
        assert selects(policy["spec"]["podSelector"]["matchLabels"], redis_labels), name
        assert not selects(policy["spec"]["podSelector"]["matchLabels"], pods["imagetag-gateway"])
        [rule] = policy["spec"]["ingress"]
        [source] = rule["from"]
        assert set(source) == {"podSelector"}, "no namespaceSelector or ipBlock: other namespaces stay out"
        admitted = {pod for pod, labels in pods.items() if selects(source["podSelector"]["matchLabels"], labels)}
        expected = {"imagetag-gateway", "imagetag-bootstrap"} | ({"imagetag-worker"} if name == "gpu-production" else set())
        assert admitted == expected, name
        redis_ports = named_ports(main_container(rendering.get("StatefulSet", "imagetag-redis")))
        assert [p["port"] for p in rule["ports"]] == ["redis"] and "redis" in redis_ports
        other_release = {**pods["imagetag-gateway"], "app.kubernetes.io/instance": "other"}
        assert not selects(source["podSelector"]["matchLabels"], other_release)
    external = renderings["external-redis"]
    assert not external.of_kind("NetworkPolicy") and not external.of_kind("StatefulSet")


def test_redis_has_a_password_and_persistence(renderings) -> None:
    redis = renderings["default"].get("StatefulSet", "imagetag-redis")
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    args = main_container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    ephemeral = render({"redis": {"persistence": {"enabled": False}}}).get("StatefulSet", "imagetag-redis")
    assert "volumeClaimTemplates" not in ephemeral["spec"]
    assert {"name": "data", "emptyDir": {}} in ephemeral["spec"]["template"]["spec"]["volumes"]


# --- secrets --------------------------------------------------------------------------------

def secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "valueFrom" in e}


def test_generated_secrets_are_kept_and_referenced(renderings) -> None:
    import base64

    default = renderings["default"]
    secret = default.get("Secret", "imagetag")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert set(secret["data"]) == {"master-key", "admin-password", "redis-password"}
    for value in secret["data"].values():
        assert len(base64.b64decode(value)) >= 24
    refs = secret_refs(main_container(deployment(default, "gateway")))
    assert refs["IMAGETAG_MASTER_KEY"] == ("imagetag", "master-key")
    assert refs["REDIS_PASSWORD"] == ("imagetag", "redis-password")
    # No secret is ever a plain value in a pod spec.
    for name, rendering in renderings.items():
        for obj, pod in workloads(rendering):
            for container in containers(pod):
                for entry in container.get("env", []):
                    if entry["name"] in ("IMAGETAG_MASTER_KEY", "REDIS_PASSWORD", "REDISCLI_AUTH", "ADMIN_PASSWORD"):
                        assert "valueFrom" in entry, f"{name}: {entry['name']}"


def test_values_and_existing_secrets(renderings) -> None:
    import base64

    given = render({"masterKey": {"value": "my-master-key"}, "bootstrap": {"password": "hunter2hunter2"}})
    data = given.get("Secret", "imagetag")["data"]
    assert base64.b64decode(data["master-key"]) == b"my-master-key"
    assert base64.b64decode(data["admin-password"]) == b"hunter2hunter2"
    production = renderings["gpu-production"]
    assert not production.of_kind("Secret"), "every secret comes from imagetag-secrets"
    refs = secret_refs(main_container(deployment(production, "worker")))
    assert refs["IMAGETAG_MASTER_KEY"] == ("imagetag-secrets", "master-key")
    assert refs["REDIS_PASSWORD"] == ("imagetag-secrets", "redis-password")
    job_refs = secret_refs(production.get("Job", "imagetag-bootstrap")["spec"]["template"]["spec"]["containers"][0])
    assert job_refs["ADMIN_PASSWORD"] == ("imagetag-secrets", "admin-password")
    external = renderings["external-redis"]
    assert secret_refs(main_container(deployment(external, "gateway")))["IMAGETAG_REDIS_URL"] == ("imagetag-redis", "redis-url")
    inline = render({"redis": {"enabled": False}, "externalRedis": {"url": "rediss://:pw@cache:6380/0"}})
    assert base64.b64decode(inline.get("Secret", "imagetag")["data"]["redis-url"]) == b"rediss://:pw@cache:6380/0"


def test_pods_roll_when_given_secrets_change_and_only_then() -> None:
    def checksums(values: dict) -> set[str]:
        rendering = render(values)
        return {o["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
                for o in rendering.objects if o["kind"] in ("Deployment", "StatefulSet")}

    [first] = checksums({"worker": {"enabled": True}})
    assert checksums({"worker": {"enabled": True}}) == {first}, "generated secrets must not roll pods on every upgrade"
    assert checksums({"worker": {"enabled": True}, "redis": {"auth": {"password": "n3w-password"}}}) != {first}
    assert checksums({"worker": {"enabled": True}, "masterKey": {"existingSecret": "mine"}}) != {first}


def test_values_schema_rejects_bad_values() -> None:
    import helm_python as helm

    bad_values = [
        {"gatway": {}},
        {"config": {"no_such_setting": 1}},
        {"config": {"port": 9000}},  # chart-managed
        {"config": {"log_level": "verbose"}},
        {"config": {"batch_max_size": 0}},
        {"weights": {"detector": "yolo99"}},
        {"redis": {"auth": {"password": "p@ss/word"}}},
        {"gateway": {"resources": {"limits": None}}},  # limits are required
        {"ingress": {"hosts": [{"host": "x.example", "paths": ["metrics"]}]}},
        {"cache": {"accessModes": ["ReadWriteSometimes"]}},
        {"cache": {"mountPath": "/cache/"}},
        {"worker": {"autoscaling": {"keda": {"trigger": "lagCount"}}}},
        {"worker": {"autoscaling": {"keda": {"externalRedis": {"address": "rediss://redis.example:6380"}}}}},
        {"metrics": {"prometheusRule": {"errorRatio": 5}}},
        {"metrics": {"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}}},
    ]
    with helm.Chart.load(CHART) as chart:
        for values in bad_values:
            with pytest.raises(helm.HelmError):
                chart.validate_schema(values)
        for _, values in rv.value_sets():
            chart.validate_schema(values)


def test_every_schema_property_has_a_documented_default() -> None:
    import json

    schema = json.loads(SCHEMA_PATH.read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    missing: list[str] = []

    def walk(node: dict, values: Any, path: str) -> None:
        if node.get("$ref") or not isinstance(values, dict):
            return  # `config` is Settings by name: only a few are set by default
        for key, child in node.get("properties", {}).items():
            if path == "" and key == "global":
                continue
            if key not in values:
                missing.append(f"{path}.{key}")
            else:
                walk(child, values[key], f"{path}.{key}")

    walk(schema, defaults, "")
    assert not missing, f"in values.schema.json but not in values.yaml: {missing}"


def test_render_fails_clearly_on_impossible_values() -> None:
    for values, message in (
        ({"redis": {"enabled": False}}, "externalRedis.url or externalRedis.existingSecret"),
        ({"weights": {"source": "pvc"}}, "weights.existingClaim"),
        ({"worker": {"enabled": True, "autoscaling": {"enabled": False, "keda": {"enabled": True}}}},
         "worker.autoscaling.keda.enabled needs worker.autoscaling.enabled=true"),
        ({"redis": {"enabled": False}, "externalRedis": {"url": "rediss://:pw@redis.example:6380/0"},
          "worker": {"enabled": True, "autoscaling": {"enabled": True, "keda": {"enabled": True}}}},
         "worker.autoscaling.keda.externalRedis.address"),
    ):
        rendering = rv.render("impossible", values)
        assert any(message in error for error in rendering.errors), rendering.errors


# --- ServiceMonitor and Ingress --------------------------------------------------------------

def test_service_monitors_only_when_enabled(renderings) -> None:
    for name in ("default", "cpu-small", "external-redis"):
        assert not renderings[name].of_kind("ServiceMonitor"), name
    production = renderings["gpu-production"]
    monitors = {m["metadata"]["name"]: m for m in production.of_kind("ServiceMonitor")}
    assert set(monitors) == {"imagetag-gateway", "imagetag-worker"}
    for monitor in monitors.values():
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [rv.NAMESPACE]}
    gateway_only = render({"metrics": {"serviceMonitor": {"enabled": True}}})
    assert [m["metadata"]["name"] for m in gateway_only.of_kind("ServiceMonitor")] == ["imagetag-gateway"]


def test_ingress_publishes_the_api_over_tls_and_nothing_else(renderings, gateway_app) -> None:
    app, _ = gateway_app
    internal = {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
    api = set(app.openapi()["paths"]) - internal
    assert {"/v2/{project_id}/image/tagging", "/v3/auth/tokens"} <= api
    assert not renderings["default"].of_kind("Ingress")
    for name in EXAMPLES:
        [ingress] = renderings[name].of_kind("Ingress")
        tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
        for rule in ingress["spec"]["rules"]:
            assert rule["host"] in tls_hosts, f"{name}: {rule['host']} is served without TLS"
            prefixes = [p["path"] for p in rule["http"]["paths"] if p["pathType"] == "Prefix"]

            def published(path: str) -> bool:  # Kubernetes Prefix matching: whole path elements
                return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)

            for path in api:
                assert published(path), f"{name}: {path} is not published"
            for path in internal:
                assert not published(path), f"{name}: {path} is published"


# --- weights --------------------------------------------------------------------------------

def manifest() -> dict[str, dict]:
    return tomllib.loads((REPO / "service" / "weights_manifest.toml").read_text())


def test_weights_fetch_matches_the_manifest_and_the_cli(renderings, monkeypatch) -> None:
    import json

    from service.cli import _parser

    entries = manifest()
    detectors = json.loads(SCHEMA_PATH.read_text())["properties"]["weights"]["properties"]["detector"]["enum"]
    assert set(detectors) == {name for name, e in entries.items() if e["kind"] == "detector"}
    for name in detectors:
        assert entries[name]["file"] == f"{name}.pt", "the chart derives the file name as <name>.pt"
    for name in ("default", "gpu-production"):
        rendering = renderings[name]
        workload = deployment(rendering, "worker" if name == "gpu-production" else "gateway")
        pod = workload["spec"]["template"]["spec"]
        [init] = pod["initContainers"]
        args = _parser().parse_args(init["command"][1:])
        assert (args.name, str(args.dir)) == (rendering.values.get("weights", {}).get("detector", "yolo11n"), init["volumeMounts"][0]["mountPath"])
        assert init["volumeMounts"][0]["name"] == "weights"
        # Not mounted over the image's /weights, which a baked image fills.
        assert init["volumeMounts"][0]["mountPath"] != "/weights"
        settings = settings_from(resolved_env(pod["containers"][0]), monkeypatch)
        assert settings.detector_weights == [Path("/weights") / entries[args.name]["file"]]
        assert {"name": "weights", "mountPath": "/weights", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_weights_from_a_claim_or_the_image(renderings, monkeypatch) -> None:
    worker = deployment(renderings["external-redis"], "worker")["spec"]["template"]["spec"]
    assert "initContainers" not in worker
    assert {"name": "weights", "persistentVolumeClaim": {"claimName": "imagetag-weights", "readOnly": True}} in worker["volumes"]
    baked = render({"weights": {"source": "image", "detectorFile": "yolo11n.pt"}})
    pod = deployment(baked, "gateway")["spec"]["template"]["spec"]
    assert "initContainers" not in pod and not any(v["name"] == "weights" for v in pod["volumes"])
    assert settings_from(resolved_env(pod["containers"][0]), monkeypatch).detector_weights == [Path("/weights/yolo11n.pt")]


# --- the bootstrap Job, for real -------------------------------------------------------------

@pytest.fixture
def chart_redis(tmp_path: Path, renderings) -> Iterator[tuple[int, str]]:
    """redis-server started with the StatefulSet's own arguments (port and dir moved to tmp)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    container = main_container(renderings["default"].get("StatefulSet", "imagetag-redis"))
    password = "Chart-Redis-Password_1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [a.replace("$(REDIS_PASSWORD)", password) for a in container["args"]]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--dir") + 1] = str(tmp_path)
    process = subprocess.Popen([*container["command"], *args, "--bind", "127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port, password
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_redis_probe_command_authenticates(renderings, chart_redis) -> None:
    port, password = chart_redis
    container = main_container(renderings["default"].get("StatefulSet", "imagetag-redis"))
    command = [c.replace(f"-p {6379}", f"-p {port}") for c in container["readinessProbe"]["exec"]["command"]]
    env = {"PATH": os.environ["PATH"]}
    assert subprocess.run(command, env={**env, "REDISCLI_AUTH": password}, timeout=10).returncode == 0
    assert subprocess.run(command, env={**env, "REDISCLI_AUTH": "wrong"}, timeout=10).returncode != 0


def test_bootstrap_job_creates_the_first_identity_idempotently(renderings, chart_redis, tmp_path) -> None:
    from service.backends import build_backends

    port, password = chart_redis
    job = renderings["default"].get("Job", "imagetag-bootstrap")
    assert set(job["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    container = job["spec"]["template"]["spec"]["containers"][0]
    admin_password = "first-admin-password"
    env = resolved_env(container, {("imagetag", "redis-password"): password, ("imagetag", "master-key"): "m" * 48,
                                   ("imagetag", "admin-password"): admin_password})
    env["IMAGETAG_REDIS_URL"] = env["IMAGETAG_REDIS_URL"].replace("@imagetag-redis:6379/", f"@127.0.0.1:{port}/")
    env.update(IMAGETAG_DATA_DIR=str(tmp_path / "data"), HOME=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    command = [kube_expand(part, env)[0] for part in container["command"]]
    for _ in range(3):  # post-install, then upgrades: nothing is created twice, nothing fails
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "are in place" in run.stdout
        assert admin_password not in run.stdout + run.stderr

    async def check() -> None:
        settings = Settings(redis_url=env["IMAGETAG_REDIS_URL"], master_key=env["IMAGETAG_MASTER_KEY"], data_dir=tmp_path)
        backends = build_backends(settings)
        try:
            store = backends.store
            domain = await store.find_domain("admin")
            assert domain is not None and [d.name for d in await store.list_domains()] == ["admin"]
            assert [u.name for u in await store.list_users(domain.id)] == ["admin"]
            assert [p.name for p in await store.list_projects(domain.id)] == ["cn-north-4"]
            assert await store.authenticate("admin", "admin", admin_password) is not None
        finally:
            await backends.close()

    asyncio.run(check())
    # Redis unreachable: the Job must fail (and be retried), not report success.
    env["IMAGETAG_REDIS_URL"] = f"redis://:{password}@127.0.0.1:1/0"
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "are in place" not in run.stdout


def test_trusted_proxy_example_is_a_network() -> None:
    values = yaml.safe_load((HELM / "examples" / "gpu-production.yaml").read_text())
    for cidr in values["config"]["trusted_proxies"]:
        ipaddress.ip_network(cidr)


# --- the chart's environment, run for real ---------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, log: Path, budget_s: float, status: int = 200) -> float:
    started = time.monotonic()
    while time.monotonic() - started < budget_s:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == status:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} did not answer {status} within {budget_s:.0f} s: {log.read_text()[-3000:]}")


def test_chart_environment_runs_a_real_gateway_and_worker(renderings, chart_redis, tmp_path) -> None:
    """The gpu-production gateway and worker, with the environment the chart gives them, on the
    chart's Redis: the worker's probe path answers, the gateway turns ready once the worker is
    alive (inside the probes' budgets), and the bootstrap admin gets a token and tags a photo.
    Only what a pod has and this machine lacks is replaced: Service DNS and ports (loopback), the
    emptyDirs (tmp), the fetched weights (the offline ones) and the GPU (cpu)."""
    import base64

    import requests

    from tests.conftest import DETECTOR_WEIGHTS, PHOTOS

    if not DETECTOR_WEIGHTS.exists():
        pytest.skip(f"offline weights missing: {DETECTOR_WEIGHTS}")
    port, password = chart_redis
    rendering = renderings["gpu-production"]
    secrets = {("imagetag-secrets", "redis-password"): password, ("imagetag-secrets", "master-key"): "M" * 48,
               ("imagetag-secrets", "admin-password"): "chart-admin-pw"}
    gateway_port, metrics_port = _free_port(), _free_port()
    bin_dir = Path(sys.executable).parent

    def environment(container: dict, name: str) -> dict[str, str]:
        env = resolved_env(container, secrets)
        env["IMAGETAG_REDIS_URL"] = env["IMAGETAG_REDIS_URL"].replace("@imagetag-redis:6379/", f"@127.0.0.1:{port}/")
        home = tmp_path / name
        for variable, path in (("IMAGETAG_DATA_DIR", "data"), ("HOME", ""), ("YOLO_CONFIG_DIR", "Ultralytics"), ("MPLCONFIGDIR", "matplotlib")):
            if variable in env:
                (home / path).mkdir(parents=True, exist_ok=True)
                env[variable] = str(home / path)
        if "IMAGETAG_HOST" in env:
            assert env["IMAGETAG_HOST"] == "0.0.0.0"
            env["IMAGETAG_HOST"] = "127.0.0.1"
        if "IMAGETAG_DETECTOR_WEIGHTS" in env:
            env["IMAGETAG_DETECTOR_WEIGHTS"] = str(DETECTOR_WEIGHTS)
        if "IMAGETAG_DEVICE" in env:
            env["IMAGETAG_DEVICE"] = "cpu"
        return {**env, "IMAGETAG_TORCH_THREADS": "2", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    worker_container = main_container(deployment(rendering, "worker"))
    gateway_container = main_container(deployment(rendering, "gateway"))
    worker_env = {**environment(worker_container, "worker"), "IMAGETAG_METRICS_PORT": str(metrics_port)}
    gateway_env = {**environment(gateway_container, "gateway"), "IMAGETAG_PORT": str(gateway_port)}
    processes: list[subprocess.Popen] = []
    handles = []
    try:
        for name, container, env in (("worker", worker_container, worker_env), ("gateway", gateway_container, gateway_env)):
            handle = (tmp_path / f"{name}.log").open("wb")
            handles.append(handle)
            processes.append(subprocess.Popen(container["command"], env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path))
        worker, gateway = processes
        base = f"http://127.0.0.1:{gateway_port}"

        def budget(container: dict, probe: str) -> float:
            # The probe's own budget, capped so that a broken setup fails in minutes, not ten.
            return min(container[probe]["periodSeconds"] * container[probe]["failureThreshold"], 180)

        _wait_for(f"http://127.0.0.1:{metrics_port}{worker_container['startupProbe']['httpGet']['path']}",
                  worker, tmp_path / "worker.log", budget(worker_container, "startupProbe"))
        _wait_for(base + gateway_container["startupProbe"]["httpGet"]["path"], gateway, tmp_path / "gateway.log",
                  budget(gateway_container, "startupProbe"))
        _wait_for(base + gateway_container["readinessProbe"]["httpGet"]["path"], gateway, tmp_path / "gateway.log",
                  budget(worker_container, "startupProbe"))
        assert requests.get(base + gateway_container["livenessProbe"]["httpGet"]["path"], timeout=5).status_code == 200

        job = rendering.get("Job", "imagetag-bootstrap")["spec"]["template"]["spec"]["containers"][0]
        job_env = environment(job, "bootstrap")
        run = subprocess.run([kube_expand(part, job_env)[0] for part in job["command"]], env=job_env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        login = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "domain": {"name": "acme"}, "name": "admin", "password": "chart-admin-pw"}}},
            "scope": {"project": {"name": "cn-north-4"}}}}
        token = requests.post(base + "/v3/auth/tokens", json=login, timeout=30)
        assert token.status_code == 201, token.text
        image = base64.b64encode((PHOTOS / "bus.jpg").read_bytes()).decode()
        tagged = requests.post(base + "/v1.0/image/tagging", json={"image": image, "language": "en"},
                               headers={"X-Auth-Token": token.headers["X-Subject-Token"]}, timeout=120)
        assert tagged.status_code == 200, tagged.text
        assert "bus" in [t["tag"] for t in tagged.json()["result"]["tags"]]
        assert requests.post(base + "/v1.0/image/tagging", json={"image": image}, timeout=30).status_code == 401
        gateway_metrics = requests.get(base + "/metrics", timeout=10).text
        assert re.search(r"^imagetag_workers_alive 1(\.0)?$", gateway_metrics, re.M), gateway_metrics[-2000:]
        worker_metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'imagetag_worker_jobs_total{outcome="tagged"} 1.0' in worker_metrics
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for handle in handles:
            handle.close()


def test_extra_detectors_run_side_by_side(monkeypatch) -> None:
    from service.cli import _parser

    fetched = render({"weights": {"extraDetectors": ["yolov8s-oiv7"]}})
    pod = deployment(fetched, "gateway")["spec"]["template"]["spec"]
    names = [_parser().parse_args(init["command"][1:]).name for init in pod["initContainers"]]
    assert names == ["yolo11n", "yolov8s-oiv7"]
    assert len({init["name"] for init in pod["initContainers"]}) == 2
    settings = settings_from(resolved_env(pod["containers"][0]), monkeypatch)
    assert settings.detector_weights == [Path("/weights/yolo11n.pt"), Path("/weights/yolov8s-oiv7.pt")]

    claimed = render({"weights": {"source": "pvc", "existingClaim": "models", "detectorFile": "yolo11s.pt",
                                  "extraDetectors": ["oiv7/yolov8s-oiv7.pt"]}})
    pod = deployment(claimed, "gateway")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    settings = settings_from(resolved_env(pod["containers"][0]), monkeypatch)
    assert settings.detector_weights == [Path("/weights/yolo11s.pt"), Path("/weights/oiv7/yolov8s-oiv7.pt")]


# --- operations: cache volume, KEDA, alerts, dashboard ---------------------------------------

def test_cache_volume_holds_fetched_weights_and_runtime_exports(renderings, monkeypatch) -> None:
    from service.cli import _parser

    assert not renderings["default"].of_kind("PersistentVolumeClaim")
    for name, which in (("gpu-keda", "worker"), ("cpu-small", "gateway")):
        rendering = renderings[name]
        cache = rendering.values["cache"]
        claim = rendering.get("PersistentVolumeClaim", "imagetag-cache")
        assert claim["spec"]["accessModes"] == cache["accessModes"]
        assert claim["spec"]["resources"]["requests"]["storage"] == cache["size"]
        pod = deployment(rendering, which)["spec"]["template"]["spec"]
        assert {"name": "cache", "persistentVolumeClaim": {"claimName": "imagetag-cache"}} in pod["volumes"]
        assert not any(v["name"] == "weights" for v in pod["volumes"]), "fetched weights live on the cache"
        detectors = [rendering.values["weights"]["detector"], *rendering.values["weights"].get("extraDetectors", [])]
        inits = pod["initContainers"]
        assert len(inits) == len(detectors)
        for init, detector in zip(inits, detectors):
            assert init["command"][:2] == ["python", "-c"]
            args = _parser().parse_args(init["command"][3:])
            assert (args.name, args.dir) == (detector, Path("/cache/weights"))
            assert {"name": "cache", "mountPath": "/cache"} in init["volumeMounts"]
        main = pod["containers"][0]
        assert {"name": "cache", "mountPath": "/cache"} in main["volumeMounts"]
        settings = settings_from(resolved_env(main), monkeypatch)
        assert settings.runtime_cache_dir == Path("/cache/runtimes")
        assert settings.detector_weights == [Path("/cache/weights") / f"{d}.pt" for d in detectors]
    # Remote gateways load no models: no cache for them.
    gateway = deployment(renderings["gpu-keda"], "gateway")["spec"]["template"]["spec"]
    assert not any(v["name"] == "cache" for v in gateway["volumes"]) and "initContainers" not in gateway

    # A claim of yours, and runtime exports only (weights from a PVC of their own).
    mine = render({"cache": {"enabled": True, "existingClaim": "shared-cache"},
                   "weights": {"source": "pvc", "existingClaim": "models"}})
    assert not mine.of_kind("PersistentVolumeClaim")
    pod = deployment(mine, "gateway")["spec"]["template"]["spec"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "shared-cache"}} in pod["volumes"]
    assert {"name": "weights", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    settings = settings_from(resolved_env(pod["containers"][0]), monkeypatch)
    assert settings.detector_weights == [Path("/weights/yolo11n.pt")]
    assert settings.runtime_cache_dir == Path("/cache/runtimes")


@pytest.fixture
def weights_server(tmp_path: Path) -> Iterator[tuple[str, bytes, list[str]]]:
    """A local HTTP server with one weights file, logging each request: the download that a
    fetch initContainer makes, without the internet."""
    import http.server
    import threading

    payload = os.urandom(64 * 1024)
    requests_seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests_seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/detector.pt", payload, requests_seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_cached_fetch_skips_a_verified_file_and_fetches_a_missing_or_bad_one(renderings, weights_server, tmp_path) -> None:
    """The initContainer's own command, run for real against a manifest whose detector comes from
    a local server: the first start downloads, the next one verifies the cached file and skips the
    download, and a damaged file is fetched again."""
    import hashlib

    url, payload, requests_seen = weights_server
    manifest = tmp_path / "manifest.toml"  # a manifest of one's own, as for an internal mirror
    manifest.write_text(
        f'[yolo11s]\nkind = "detector"\nfile = "yolo11s.pt"\nurl = "{url}"\n'
        f'sha256 = "{hashlib.sha256(payload).hexdigest()}"\nsize = {len(payload)}\n'
        'license = "AGPL-3.0"\nclasses = "coco80"\ndescription = "test"\n')
    cache = tmp_path / "cache"
    init = deployment(renderings["gpu-keda"], "worker")["spec"]["template"]["spec"]["initContainers"][0]
    command = [sys.executable if part == "python" else part.replace("/cache", str(cache)) for part in init["command"]]
    env = {**resolved_env(init), "HOME": str(tmp_path), "IMAGETAG_WEIGHTS_MANIFEST": str(manifest),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    target = cache / "weights" / "yolo11s.pt"

    def start() -> subprocess.CompletedProcess:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert target.read_bytes() == payload
        return run

    start()
    assert len(requests_seen) == 1
    again = start()
    assert len(requests_seen) == 1, "a verified file must not be downloaded again"
    assert "verified in the cache" in again.stdout
    target.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # same size, wrong digest
    start()
    assert len(requests_seen) == 2
    target.write_bytes(payload[:100])  # cut short
    start()
    assert len(requests_seen) == 3


def test_keda_scales_workers_on_the_job_stream(renderings) -> None:
    from inference.remote import Channels

    rendering = renderings["gpu-keda"]
    autoscaling = rendering.values["worker"]["autoscaling"]
    assert {h["metadata"]["name"] for h in rendering.of_kind("HorizontalPodAutoscaler")} == {"imagetag-gateway"}, \
        "KEDA makes the worker HPA; the chart's own would fight it"
    worker = deployment(rendering, "worker")
    assert "replicas" not in worker["spec"]
    scaled = rendering.get("ScaledObject", "imagetag-worker")["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "imagetag-worker"}
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (autoscaling["minReplicas"], autoscaling["maxReplicas"])
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == autoscaling["behavior"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "redis-streams"
    metadata = trigger["metadata"]
    assert metadata["stream"] == Channels().stream
    # With a consumerGroup, KEDA would count pending entries, not the stream's length.
    assert "consumerGroup" not in metadata and metadata["streamLength"] == str(autoscaling["keda"]["target"])
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA's trigger metadata is a map of strings"
    host, port = metadata["address"].rsplit(":", 1)
    service = rendering.get("Service", "imagetag-redis")
    assert host == f"imagetag-redis.{rv.NAMESPACE}.svc", "the operator resolves names from its own namespace"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert metadata["databaseIndex"] == "0"
    # The password comes from the Secret the workers read it from.
    auth = rendering.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
    [secret_ref] = auth["spec"]["secretTargetRef"]
    password_env = next(e for e in main_container(worker)["env"] if e["name"] == "REDIS_PASSWORD")
    assert secret_ref["parameter"] == "password"
    assert {"name": secret_ref["name"], "key": secret_ref["key"]} == password_env["valueFrom"]["secretKeyRef"]
    # The built-in Redis admits the KEDA operator's namespace.
    [rule] = rendering.get("NetworkPolicy", "imagetag-redis")["spec"]["ingress"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in rule["from"]
    [rule] = renderings["gpu-production"].get("NetworkPolicy", "imagetag-redis")["spec"]["ingress"]
    assert not any("namespaceSelector" in peer for peer in rule["from"])

    pending = render({"worker": {"enabled": True, "autoscaling": {"enabled": True, "keda": {
        "enabled": True, "trigger": "pendingEntriesCount", "target": 8}}}})
    metadata = pending.get("ScaledObject", "imagetag-worker")["spec"]["triggers"][0]["metadata"]
    assert (metadata["consumerGroup"], metadata["pendingEntriesCount"]) == (Channels().group, "8")
    assert "streamLength" not in metadata
    assert not any(h["metadata"]["name"] == "imagetag-worker" for h in pending.of_kind("HorizontalPodAutoscaler"))
    assert not renderings["gpu-production"].of_kind("ScaledObject")


def test_keda_on_an_external_redis() -> None:
    values = {"redis": {"enabled": False}, "externalRedis": {"existingSecret": "imagetag-redis"},
              "worker": {"enabled": True, "autoscaling": {"enabled": True, "keda": {"enabled": True, "externalRedis": {
                  "address": "redis.example.internal:6380", "databaseIndex": 2, "enableTLS": True,
                  "passwordSecret": "imagetag-redis", "passwordSecretKey": "password"}}}}}
    rendering = render(values)
    [trigger] = rendering.get("ScaledObject", "imagetag-worker")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "redis.example.internal:6380"
    assert (trigger["metadata"]["databaseIndex"], trigger["metadata"]["enableTLS"]) == ("2", "true")
    auth = rendering.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "imagetag-redis", "key": "password"}]
    assert not rendering.of_kind("NetworkPolicy")
    values["worker"]["autoscaling"]["keda"]["externalRedis"]["passwordSecret"] = ""
    no_password = render(values)
    assert not no_password.of_kind("TriggerAuthentication")
    assert "authenticationRef" not in no_password.get("ScaledObject", "imagetag-worker")["spec"]["triggers"][0]


def exported_metric_names() -> set[str]:
    """Every series name the gateway and the worker really export (`up` is Prometheus's own)."""
    from service.metrics import Metrics
    from service.worker_metrics import WorkerMetrics

    names = {"up"}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for registry in (Metrics([0.1, 1.0]).registry, WorkerMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers before a selector's `{`."""
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))


def test_prometheus_rules_alert_on_metrics_that_exist(renderings) -> None:
    exported = exported_metric_names()
    assert not renderings["gpu-production"].of_kind("PrometheusRule")
    remote = renderings["gpu-keda"]
    local = render({"metrics": {"prometheusRule": {"enabled": True, "queueDepth": 20}}})
    alerts = {}
    for rendering in (remote, local):
        [rule] = rendering.of_kind("PrometheusRule")
        assert rule["metadata"]["labels"].get("release") == rendering.values["metrics"]["prometheusRule"].get("labels", {}).get("release")
        services = {s["metadata"]["name"] for s in rendering.of_kind("Service")}
        names = set()
        for group in rule["spec"]["groups"]:
            for alert in group["rules"]:
                names.add(alert["alert"])
                used = promql_metrics(alert["expr"])
                assert used and used <= exported, f"{alert['alert']}: {used - exported} are not exported"
                # Series are picked by the Service name the ServiceMonitors give as `job`.
                jobs = set(re.findall(r'job="([^"]+)"', alert["expr"]))
                assert jobs and jobs <= services, alert["alert"]
                assert f'namespace="{rv.NAMESPACE}"' in alert["expr"]
                assert alert["labels"]["severity"] in ("warning", "critical")
                assert alert["annotations"]["summary"]
        alerts[rendering.name] = names
    shared = {"ImagetagHighErrorRate", "ImagetagHighLatency", "ImagetagUnavailable", "ImagetagGatewayRedisErrors"}
    assert alerts["gpu-keda"] == shared | {
        "ImagetagNoWorkers", "ImagetagWorkerDown", "ImagetagRedisErrors", "ImagetagJobBacklog", "ImagetagJobsExpiring"}
    assert alerts["test"] == shared | {"ImagetagQueueBacklog", "ImagetagModelsNotReady"}
    [rule] = remote.of_kind("PrometheusRule")
    high_errors = next(a for g in rule["spec"]["groups"] for a in g["rules"] if a["alert"] == "ImagetagHighErrorRate")
    assert high_errors["expr"].strip().endswith("> 0.02") and high_errors["labels"]["team"] == "vision"
    [rule] = local.of_kind("PrometheusRule")
    backlog = next(a for g in rule["spec"]["groups"] for a in g["rules"] if a["alert"] == "ImagetagQueueBacklog")
    assert backlog["expr"].strip().endswith("> 20")


def test_prometheus_rule_fires_on_the_error_codes_the_app_answers() -> None:
    # Redis failures reach clients as Overloaded: the code ImagetagUnavailable watches.
    from service.errors import CATALOGUE, Overloaded
    from service.ratelimit import RateLimiterUnavailable

    assert CATALOGUE[Overloaded] == (503, "AIS.0506") and issubclass(RateLimiterUnavailable, Overloaded)
    [rule] = render({"metrics": {"prometheusRule": {"enabled": True}}}).of_kind("PrometheusRule")
    unavailable = next(a for g in rule["spec"]["groups"] for a in g["rules"] if a["alert"] == "ImagetagUnavailable")
    assert 'status="503", code="AIS.0506"' in unavailable["expr"]


def test_grafana_dashboard_configmap(renderings) -> None:
    import json

    assert not renderings["default"].of_kind("ConfigMap")
    rendering = renderings["gpu-keda"]
    config_map = rendering.get("ConfigMap", "imagetag-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "imagetag"}
    [(key, text)] = config_map["data"].items()
    assert key.endswith(".json")
    dashboard = json.loads(text)
    assert dashboard == json.loads((CHART / "dashboards" / "imagetag.json").read_text())
    exported = exported_metric_names()
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = promql_metrics(target["expr"])
            assert names and names <= exported, f"{panel['title']}: {names - exported} are not exported"
            used |= names
    # What an operator needs on one screen: requests by status/code, p50/p99, queue depth,
    # batch size, workers alive and model time.
    assert {"imagetag_requests_total", "imagetag_request_duration_seconds_bucket", "imagetag_queue_depth",
            "imagetag_batch_size_sum", "imagetag_worker_batch_size_sum", "imagetag_workers_alive",
            "imagetag_model_seconds_bucket", "imagetag_worker_model_seconds_bucket"} <= used
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert "sum by (status, code)" in exprs and "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert set(re.findall(r"\$(\w+)", exprs)) - {"__rate_interval"} <= variables
    custom = render({"metrics": {"grafanaDashboard": {"enabled": True, "labels": {"dashboards": "imagetag"}}}})
    assert custom.get("ConfigMap", "imagetag-dashboard")["metadata"]["labels"]["dashboards"] == "imagetag"
