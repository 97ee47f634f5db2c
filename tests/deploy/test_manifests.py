"""Invariants over the rendered manifests: what `make deploy-check` (schemas) cannot see.

Each test reads the objects as the cluster would get them (kubectl kustomize) and checks them
against the server's own code: its config loader, its health service names, its metric
names and its drain timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ENV_PREFIX, ServiceConfig
from service.server import HEALTH_SERVICES, LIVENESS_SERVICE, SERVICE_NAME
from service.telemetry.names import QUEUE_ITEMS_METRIC, QUEUE_TOKENS_METRIC
from tests.deploy.manifests import (
    GPU_RESOURCE,
    GPU_SERVING,
    K8S,
    KUSTOMIZATIONS,
    SERVING,
    Obj,
    all_containers,
    container_env,
    container_port,
    embed_variables,
    kustomization_dirs,
    matches,
    mounts,
    of_kind,
    one,
    pod_specs,
    prestop_sleep_s,
    probe_budget_s,
    quantity,
    server_config,
    server_container,
    writable_mount,
)

# Time the process needs after the drain: the vLLM engine shuts down in about 5 s.
ENGINE_SHUTDOWN_MARGIN_S = 10
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Variables naming a directory a library writes to; the root filesystem is read-only.
CACHE_VARIABLES = (
    "HOME",
    "TMPDIR",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "HF_HOME",
    "VLLM_CACHE_ROOT",
    "VLLM_CONFIG_ROOT",
    "TRITON_CACHE_DIR",
    "CUDA_CACHE_PATH",
)

serving = pytest.mark.parametrize("variant", SERVING)
gpu_serving = pytest.mark.parametrize("variant", GPU_SERVING)


def deployment(rendered: dict[str, list[Obj]], variant: str) -> Obj:
    return one(rendered[variant], "Deployment", "embedding-service")


def pod_spec(rendered: dict[str, list[Obj]], variant: str) -> Obj:
    spec: Obj = deployment(rendered, variant)["spec"]["template"]["spec"]
    return spec


def server(rendered: dict[str, list[Obj]], variant: str) -> Obj:
    return server_container(deployment(rendered, variant))


def config(rendered: dict[str, list[Obj]], variant: str) -> ServiceConfig:
    return server_config(server(rendered, variant), rendered[variant])


def hpa(rendered: dict[str, list[Obj]], variant: str) -> Obj:
    return one(rendered[variant], "HorizontalPodAutoscaler")


# --- coverage ----------------------------------------------------------------------------


def test_every_kustomization_is_rendered_and_checked() -> None:
    assert kustomization_dirs() == set(KUSTOMIZATIONS)


# --- server configuration ----------------------------------------------------------------


@serving
def test_every_embed_variable_is_a_server_setting(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    # load_config ignores unknown EMBED_* names: a misspelt one would silently do nothing.
    fields = {f.upper() for f in ServiceConfig.__dataclass_fields__}
    for name in embed_variables(server(rendered, variant), rendered[variant]):
        assert name.removeprefix(ENV_PREFIX) in fields, f"{variant}: {name} is no setting"


@serving
def test_server_listens_on_all_interfaces_on_the_declared_ports(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    container = server(rendered, variant)
    cfg = config(rendered, variant)
    assert cfg.host == "0.0.0.0"
    assert cfg.port == container_port(container, "grpc")
    assert cfg.health_port == container_port(container, "health")
    declared = [int(p["containerPort"]) for p in container["ports"]]
    assert len(declared) == len(set(declared))
    assert cfg.metrics_port == container_port(container, "metrics")
    assert cfg.http_port == container_port(container, "http")
    # /metrics must be reachable from a scraper in another pod whatever EMBED_HOST says.
    assert cfg.metrics_host == "0.0.0.0"


@serving
def test_probes_call_the_servers_health_services_on_its_plaintext_health_port(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    container = server(rendered, variant)
    cfg = config(rendered, variant)
    ports = {int(p["containerPort"]) for p in container["ports"]}
    for kind in PROBES:
        probe = container[kind]
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), f"{kind}: not gRPC"
        port = probe["grpc"]["port"]
        # The kubelet's gRPC probe takes a number only, and sends no TLS.
        assert isinstance(port, int), f"{kind}: port {port!r} is not a number"
        assert port in ports
        assert port == (cfg.health_port or cfg.port)
    assert container["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert SERVICE_NAME in HEALTH_SERVICES
    # Liveness never waits on the engine: a busy or loading GPU must not restart the pod.
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert LIVENESS_SERVICE not in HEALTH_SERVICES


@serving
def test_liveness_does_not_act_before_startup_or_too_quickly(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    container = server(rendered, variant)
    # Liveness is checked only after the startup probe succeeds; a loaded server that
    # stalls for a minute (one huge batch, a GC pause) is not restarted.
    assert probe_budget_s(container["livenessProbe"]) >= 60
    assert container["readinessProbe"]["periodSeconds"] <= 10
    # Model loading: at least 5 minutes (CPU), 10 for the GPU overlays.
    floor = 600 if variant in GPU_SERVING else 300
    assert probe_budget_s(container["startupProbe"]) >= floor


@serving
def test_grace_period_covers_prestop_drain_and_engine_shutdown(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    pod = pod_spec(rendered, variant)
    container = server(rendered, variant)
    cfg = config(rendered, variant)
    env = container_env(container, rendered[variant]).values
    # The drain the server actually does: EMBED_GRACE_S if set, else its default.
    assert cfg.grace_s == float(env.get("EMBED_GRACE_S", ServiceConfig().grace_s))
    pre_stop = prestop_sleep_s(container)
    assert pre_stop >= 1, "no pause for endpoint removal to reach clients before SIGTERM"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + cfg.grace_s + ENGINE_SHUTDOWN_MARGIN_S
    # grpc.max_connection_age_grace_ms equals grace_s: a connection closed for its age
    # gets the same drain time as one closed by SIGTERM.
    assert cfg.max_connection_age_s > 0, "clients would never re-resolve and spread"


@serving
def test_connection_age_lets_clients_reach_new_pods_before_scale_down(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    # Clients learn about a new pod when a connection ages out and they re-resolve DNS.
    # That must happen well within the scale-down window, or a new pod looks idle
    # (queue 0) and is removed before it ever gets traffic.
    cfg = config(rendered, variant)
    window = hpa(rendered, variant)["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert cfg.max_connection_age_s + cfg.grace_s <= window / 2


# --- labels and selectors ----------------------------------------------------------------


@serving
def test_selectors_match_the_pod_labels(rendered: dict[str, list[Obj]], variant: str) -> None:
    objects = rendered[variant]
    dep = deployment(rendered, variant)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert matches(dep["spec"]["selector"]["matchLabels"], labels)
    for svc in of_kind(objects, "Service"):
        assert matches(svc["spec"]["selector"], labels), svc["metadata"]["name"]
    pdb = one(objects, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    for spread in dep["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert matches(spread["labelSelector"]["matchLabels"], labels)
    target = hpa(rendered, variant)["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])


@serving
def test_services_name_container_ports_and_say_grpc_and_http(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    container = server(rendered, variant)
    services = {s["metadata"]["name"]: s for s in of_kind(rendered[variant], "Service")}
    headless = services["embedding-service"]
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    mesh = services["embedding-service-mesh"]
    assert mesh["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert mesh["spec"].get("clusterIP") != "None"
    for svc in services.values():
        targets = set()
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            number = container_port(container, target) if isinstance(target, str) else target
            assert number in {p["containerPort"] for p in container["ports"]}
            targets.add(number)
            if port["name"] in ("grpc", "http"):
                assert port["appProtocol"] == port["name"]
                assert number == container_port(container, port["name"])
        # Both faces through both Services.
        assert container_port(container, "grpc") in targets
        assert container_port(container, "http") in targets
        # The health port is for the kubelet only.
        assert container_port(container, "health") not in targets


@serving
def test_metrics_are_scraped_once_from_the_metrics_port(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objects = rendered[variant]
    dep = deployment(rendered, variant)
    metrics_port = container_port(server_container(dep), "metrics")
    annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
    monitors = of_kind(objects, "ServiceMonitor")
    # Either annotations or a ServiceMonitor, never both (every pod scraped twice).
    assert bool(monitors) != ("prometheus.io/scrape" in annotations)
    if annotations.get("prometheus.io/scrape") == "true":
        assert int(annotations["prometheus.io/port"]) == metrics_port
        assert annotations["prometheus.io/path"] == "/metrics"
    for monitor in monitors:
        selected = [
            s
            for s in of_kind(objects, "Service")
            if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        exposing = [
            p for s in selected for p in s["spec"]["ports"] if p["name"] == endpoint["port"]
        ]
        assert len(exposing) == 1, "each pod must be scraped through exactly one Service"
        assert exposing[0]["targetPort"] in ("metrics", metrics_port)


# --- scaling and availability ------------------------------------------------------------


@serving
def test_hpa_scales_on_the_exported_queue_gauge(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    spec = hpa(rendered, variant)["spec"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == QUEUE_ITEMS_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert quantity(metric["pods"]["target"]["averageValue"]) > 0
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    # The HPA owns the replica count: an apply must not reset it.
    assert "replicas" not in deployment(rendered, variant)["spec"]


@serving
def test_scale_down_is_slower_than_a_model_load(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    behavior = hpa(rendered, variant)["spec"]["behavior"]
    down, up = behavior["scaleDown"], behavior["scaleUp"]
    startup = probe_budget_s(server(rendered, variant)["startupProbe"])
    assert down["stabilizationWindowSeconds"] >= startup
    assert down["stabilizationWindowSeconds"] > up.get("stabilizationWindowSeconds", 0)
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1
        assert policy["periodSeconds"] >= 60


@serving
def test_rollout_and_disruptions_keep_capacity(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    spec = deployment(rendered, variant)["spec"]
    rolling = spec["strategy"]["rollingUpdate"]
    assert (rolling["maxUnavailable"], rolling["maxSurge"]) == (0, 1)
    startup = probe_budget_s(server(rendered, variant)["startupProbe"])
    assert spec["progressDeadlineSeconds"] >= startup
    pdb = one(rendered[variant], "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_prometheus_adapter_rule_publishes_the_hpa_metric() -> None:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    rules: list[dict[str, Any]] = values["rules"]["custom"]
    published = {r["name"]["as"]: r for r in rules}
    assert set(published) == {QUEUE_ITEMS_METRIC, QUEUE_TOKENS_METRIC}
    for name, rule in published.items():
        assert rule["seriesQuery"].startswith(name + "{")
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert "<<.GroupBy>>" in rule["metricsQuery"]


# --- security and resources --------------------------------------------------------------


@pytest.mark.parametrize("variant", KUSTOMIZATIONS)
def test_every_container_has_resources_and_a_locked_down_security_context(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    workloads = list(pod_specs(rendered[variant]))
    assert workloads
    for workload, pod in workloads:
        assert pod["automountServiceAccountToken"] is False, workload
        pod_security = pod.get("securityContext", {})
        for c in all_containers(pod):
            where = f"{variant} {workload} {c['name']}"
            resources = c.get("resources", {})
            for key in ("cpu", "memory"):
                assert quantity(resources["requests"][key]) > 0, where
            assert quantity(resources["limits"]["memory"]) > 0, where
            assert quantity(resources["limits"]["memory"]) >= quantity(
                resources["requests"]["memory"]
            )
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_security.get("runAsUser", 0)) != 0, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            seccomp = sc.get("seccompProfile", pod_security.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where


@pytest.mark.parametrize("variant", KUSTOMIZATIONS)
def test_service_accounts_carry_no_token(rendered: dict[str, list[Obj]], variant: str) -> None:
    for account in of_kind(rendered[variant], "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


@serving
def test_caches_and_shared_memory_are_writable(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    pod = pod_spec(rendered, variant)
    container = server(rendered, variant)
    env = container_env(container, rendered[variant]).values
    for name in CACHE_VARIABLES:
        assert name in env, f"{name} unset: the library falls back to the read-only root"
        assert writable_mount(env[name], container, pod), f"{name}={env[name]} not writable"
    _mount, shm = mounts(container, pod)["/dev/shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    # Memory-backed volumes count against the memory limit.
    memory_volumes = sum(
        quantity(v["emptyDir"]["sizeLimit"])
        for v in pod["volumes"]
        if v.get("emptyDir", {}).get("medium") == "Memory"
    )
    kv_cache = quantity(env.get("VLLM_CPU_KVCACHE_SPACE", "0") + "Gi")
    limit = quantity(container["resources"]["limits"]["memory"])
    assert memory_volumes + kv_cache <= limit / 2


@serving
def test_weights_are_never_downloaded_at_start(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    pod = pod_spec(rendered, variant)
    container = server(rendered, variant)
    env = container_env(container, rendered[variant]).values
    assert env["HF_HUB_OFFLINE"] == "1"
    cfg = config(rendered, variant)
    if variant in GPU_SERVING:
        # From a read-only PersistentVolumeClaim.
        (mount_path,) = [p for p in mounts(container, pod) if cfg.model.startswith(p + "/")]
        mount, volume = mounts(container, pod)[mount_path]
        assert mount["readOnly"] is True
        assert volume["persistentVolumeClaim"]["readOnly"] is True
    else:
        assert cfg.model == ServiceConfig().model, "the CPU image serves the bundled model"


# --- GPU and CPU overlays ----------------------------------------------------------------


@gpu_serving
def test_gpu_overlays_take_one_whole_gpu_in_bf16(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    resources = server(rendered, variant)["resources"]
    assert resources["limits"][GPU_RESOURCE] == 1
    # Extended resources: a request, if given, must equal the limit.
    assert resources["requests"].get(GPU_RESOURCE, 1) == 1
    # Guaranteed QoS.
    assert resources["requests"] == resources["limits"]
    cfg = config(rendered, variant)
    assert cfg.dtype == "bfloat16"
    assert cfg.gpu_memory_utilization == 0.9
    assert cfg.enforce_eager
    assert cfg.served_model_name == "Qwen/Qwen3-Embedding-4B"
    # Qwen3-Embedding's whole window (issue 19); the batch budget only sizes batches.
    assert cfg.max_model_len == 32768
    assert 0 < cfg.max_batch_tokens <= cfg.max_model_len
    image = server(rendered, variant)["image"]
    assert image.endswith("-gpu"), image
    tolerated = {t["key"] for t in pod_spec(rendered, variant).get("tolerations", [])}
    assert GPU_RESOURCE in tolerated


def test_24gb_variant_fits_a_smaller_card_than_the_default(
    rendered: dict[str, list[Obj]],
) -> None:
    big = config(rendered, "overlays/gpu")
    small = config(rendered, "overlays/gpu-24gb")
    assert small.max_batch_tokens < big.max_batch_tokens
    assert small.max_queue_tokens < big.max_queue_tokens
    assert small.model == big.model
    # 4B in bf16: 8 GB of weights; KV cache of the longest step (one whole window): 144 KiB
    # per token; activations of that step: about 4 GB at most.
    kv_bytes = max(small.max_batch_tokens, small.max_model_len) * 36 * 8 * 128 * 2 * 2
    assert 8.0e9 + kv_bytes + 4e9 < 24e9 * small.gpu_memory_utilization


def test_cpu_overlay_needs_no_gpu_and_bounds_its_threads(
    rendered: dict[str, list[Obj]],
) -> None:
    container = server(rendered, "overlays/cpu")
    for section in ("requests", "limits"):
        assert GPU_RESOURCE not in container["resources"][section]
    assert container["image"].endswith("-cpu")
    env = container_env(container, rendered["overlays/cpu"]).values
    assert env["OMP_NUM_THREADS"] == str(int(quantity(container["resources"]["limits"]["cpu"])))
    assert "VLLM_CPU_KVCACHE_SPACE" in env


# --- model download and secrets ----------------------------------------------------------


def test_model_download_fills_the_volume_the_gpu_overlay_reads(
    rendered: dict[str, list[Obj]],
) -> None:
    job = one(rendered["model-download"], "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container, rendered["model-download"]).values
    args = [a.replace("$(MODEL_DIR)", env["MODEL_DIR"]) for a in container["args"]]
    local_dir = args[args.index("--local-dir") + 1]
    assert "$(MODEL_ID)" in container["args"]
    gpu = rendered["overlays/gpu"]
    assert local_dir == config(rendered, "overlays/gpu").model
    claim = one(gpu, "PersistentVolumeClaim")["metadata"]["name"]
    job_mount, job_volume = mounts(container, pod)["/models"]
    assert job_volume["persistentVolumeClaim"]["claimName"] == claim
    assert not job_mount.get("readOnly", False)
    assert (
        one(rendered["model-download"], "Job")["metadata"]["namespace"]
        == one(gpu, "PersistentVolumeClaim")["metadata"]["namespace"]
    )


def test_example_secrets_have_the_names_and_keys_the_pods_use(
    rendered: dict[str, list[Obj]],
) -> None:
    examples = [
        d for d in yaml.safe_load_all((K8S / "examples" / "secrets.example.yaml").read_text()) if d
    ]
    secrets = {s["metadata"]["name"]: s for s in of_kind(examples, "Secret")}
    objects = rendered["examples/gpu-tls-monitoring"]
    container = server(rendered, "examples/gpu-tls-monitoring")
    refs = container_env(container, objects).from_secrets
    api_keys = refs["EMBED_API_KEYS"]
    assert api_keys["optional"] is True, "the service must start without API keys"
    assert api_keys["key"] in secrets[api_keys["name"]]["stringData"]
    tls_volume = next(
        v for v in pod_spec(rendered, "examples/gpu-tls-monitoring")["volumes"] if "secret" in v
    )
    tls = secrets[tls_volume["secret"]["secretName"]]
    assert tls["type"] == "kubernetes.io/tls"
    cfg = config(rendered, "examples/gpu-tls-monitoring")
    tls_mount = next(
        p
        for p, (_m, v) in mounts(
            container, pod_spec(rendered, "examples/gpu-tls-monitoring")
        ).items()
        if v is tls_volume
    )
    for path in (cfg.tls_cert_file, cfg.tls_key_file):
        assert Path(path).parent == Path(tls_mount)
        assert Path(path).name in tls["stringData"]
    # Without the component, no TLS: probes and plaintext clients keep working.
    assert config(rendered, "overlays/gpu").tls_cert_file == ""
