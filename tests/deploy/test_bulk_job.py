"""The embed-files Indexed Job (deploy/k8s/bulk-job), read as the cluster and the CLI would:
its arguments through embed-files' own parser, its shard variables through the CLI's own
reading of them, its target against the rendered headless Service."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import PurePosixPath

import pytest
import yaml

from embedding_client.cli.main import build_parser
from embedding_client.cli.shards import COUNT_ENV, INDEX_ENV, shard_from_env
from tests.deploy.manifests import K8S, ROOT, Obj, container_env, mounts, of_kind, one

JOB = "bulk-job"
# A kustomization of the service the Job targets (every one renders the same Services).
SERVICE_VARIANT = "overlays/cpu"
CLUSTER_DOMAIN = "cluster.local"


@pytest.fixture
def job(rendered: dict[str, list[Obj]]) -> Obj:
    return one(rendered[JOB], "Job", "embed-files")


def _pod(job: Obj) -> Obj:
    pod: Obj = job["spec"]["template"]["spec"]
    return pod


def _container(job: Obj) -> Obj:
    containers: list[Obj] = _pod(job)["containers"]
    (container,) = containers
    return container


def _args(job: Obj, rendered: dict[str, list[Obj]]) -> argparse.Namespace:
    """embed-files' own reading of the container's command line, with $(VAR) expanded as
    the kubelet would (from values and from the pod's namespace)."""
    container = _container(job)
    env = container_env(container, rendered[JOB])
    pod_fields = {"metadata.namespace": job["metadata"]["namespace"]}
    values = {**env.values, **{name: pod_fields[f] for name, f in env.from_fields.items()}}
    argv = [*container["command"], *container["args"]]
    scripts = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[argv[0]] == "embedding_client.cli.main:main"
    for name, value in values.items():
        argv = [arg.replace(f"$({name})", value) for arg in argv]
    assert not any("$(" in arg for arg in argv), argv
    return build_parser().parse_args(argv[1:])


def test_it_is_an_indexed_job_whose_pods_know_their_shard(
    job: Obj, rendered: dict[str, list[Obj]]
) -> None:
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    completions = spec["completions"]
    assert completions > 1 and 1 <= spec["parallelism"] <= completions
    env = container_env(_container(job), rendered[JOB]).values
    # Kubernetes sets the index; the count must be set by the manifest, to spec.completions.
    assert env[COUNT_ENV] == str(completions)
    assert INDEX_ENV not in env
    shards = {shard_from_env({**env, INDEX_ENV: str(i)}) for i in range(completions)}
    assert sorted((s.index, s.count) for s in shards) == [
        (i, completions) for i in range(completions)
    ]
    assert _args(job, rendered).shard is None  # the variables decide


def test_it_targets_every_pod_of_the_headless_service(
    job: Obj, rendered: dict[str, list[Obj]]
) -> None:
    args = _args(job, rendered)
    headless = [
        s
        for s in of_kind(rendered[SERVICE_VARIANT], "Service")
        if s["spec"].get("clusterIP") == "None"
    ]
    (service,) = headless
    (grpc_port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert job["metadata"]["namespace"] == namespace
    assert args.server == f"dns:///{name}.{namespace}.svc.{CLUSTER_DOMAIN}:{grpc_port}"
    assert args.streams > 1  # several streams per pod, spread by round_robin


def test_the_corpus_is_mounted_read_only_and_the_output_writable(
    job: Obj, rendered: dict[str, list[Obj]]
) -> None:
    args = _args(job, rendered)
    pod, container = _pod(job), _container(job)
    mounted = mounts(container, pod)

    def mount_of(path: str) -> tuple[Obj, Obj]:
        for mount_path, pair in mounted.items():
            if PurePosixPath(path).is_relative_to(mount_path):
                return pair
        raise AssertionError(f"{path} is on no volume")

    for source in args.inputs:
        mount, volume = mount_of(source)
        assert mount["readOnly"] is True
        assert volume["persistentVolumeClaim"]["readOnly"] is True
    mount, volume = mount_of(str(args.out))
    assert not mount.get("readOnly", False)
    assert "claimName" in volume["persistentVolumeClaim"]  # shared by every pod
    assert mount_of(str(args.out))[1]["name"] != mount_of(args.inputs[0])[1]["name"]


def test_a_failed_shard_is_retried_alone_and_resumes(job: Obj) -> None:
    spec = job["spec"]
    # A retry is a new pod that resumes from the committed parts; the kubelet restarting
    # the container in place would hide failures from backoffLimitPerIndex.
    assert _pod(job)["restartPolicy"] == "Never"
    assert spec["backoffLimitPerIndex"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    final = [r for r in rules if r["action"] == "FailIndex"]
    (codes,) = [r["onExitCodes"] for r in final]
    # embed-files: 1 some documents failed for good, 2 usage; 3 (server gone) is retried.
    assert codes["operator"] == "In" and sorted(codes["values"]) == [1, 2]
    assert codes["containerName"] == _container(job)["name"]
    ignored = [c["type"] for r in rules if r["action"] == "Ignore" for c in r["onPodConditions"]]
    assert ignored == ["DisruptionTarget"]


def test_the_api_key_secret_has_an_example(job: Obj, rendered: dict[str, list[Obj]]) -> None:
    ref = container_env(_container(job), rendered[JOB]).from_secrets["EMBED_API_KEY"]
    assert ref["optional"] is True  # servers without keys need none
    examples = yaml.safe_load_all((K8S / "examples" / "secrets.example.yaml").read_text())
    secrets = {s["metadata"]["name"]: s for s in examples if s and s["kind"] == "Secret"}
    assert ref["key"] in secrets[ref["name"]]["stringData"]
