"""Launch manifests for a cluster: an sbatch script for Slurm, Kubernetes objects for an Indexed Job or a PyTorchJob.

Each starts one `keel train CONFIG --nproc G` per node with the multi-node flags (or Slurm's environment), so the
run's own launcher (restarts, preemption, crash-loop detection) runs on every node, and a requeued job or a
replaced pod runs the same command and continues the run from its run dir.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from keel.config import Config
from keel.config_toml import load_config
from keel.distributed.mesh import resolve_layout
from keel.errors import ConfigError, LaunchError
from keel.launch.rendezvous import DEFAULT_PORT
from keel.models import model_args
from keel.train.checks import check_layout as check_model_layout

WORKDIR = "/workspace"  # the pods' working directory: the run-dir volume, so relative run and data paths land on it
CONFIG_DIR = "/etc/keel"
PREEMPTED = [138, 143]  # keel train's exit codes for SIGUSR1 and SIGTERM: a checkpoint was committed


@dataclass(frozen=True)
class Launch:
    """What a manifest launches: the config (as given and loaded), the machines, the `--set` overrides."""

    config: Path
    cfg: Config
    nodes: int
    gpus: int
    overrides: list[str]

    @property
    def name(self) -> str:
        """A DNS-1123 name from run.name, short enough for an Indexed Job's pod host names."""
        return re.sub(r"[^a-z0-9-]+", "-", self.cfg.run.name.lower()).strip("-")[:40].strip("-") or "keel"

    def train_args(self, config: str) -> list[str]:
        """`train CONFIG --nproc G --set ...`: what every node runs."""
        sets = [arg for override in self.overrides for arg in ("--set", override)]
        return ["train", config, "--nproc", str(self.gpus), *sets]


def plan(config: Path, overrides: list[str], nodes: int, gpus: int | None) -> Launch:
    """Load and check the config for `nodes` machines of `gpus` GPUs each (default: its parallel.nproc)."""
    cfg = load_config(config, overrides)
    spec, args = model_args(cfg.model_section())  # as strict here as where the run will use it
    launch = Launch(config.resolve(), cfg, nodes, gpus or cfg.parallel.nproc, list(overrides))
    check_layout(launch)
    on_cluster = cfg.parallel.model_copy(update={"nproc": launch.gpus, "nnodes": nodes})
    check_model_layout(cfg.model_copy(update={"parallel": on_cluster}), spec, args)
    return launch


def _data_parallel(cfg: Config, ranks: int) -> int | None:
    """Data-parallel ranks of the mesh over `ranks` processes; None when the mesh does not fit them."""
    try:
        return resolve_layout(cfg.parallel, ranks).dp
    except ConfigError:
        return None


def _splits(cfg: Config, ranks: int) -> bool:
    dp = _data_parallel(cfg, ranks)
    micro = cfg.train.micro_batch_size
    batch = cfg.train.global_batch_size
    return dp is not None and batch % dp == 0 and (micro is None or (batch // dp) % micro == 0)


def check_layout(launch: Launch) -> None:
    """Refuse more GPUs per node than the config's mesh and batch layout allow: one line with the fix."""
    cfg, nodes, gpus = launch.cfg, launch.nodes, launch.gpus
    if _splits(cfg, nodes * gpus):
        return
    fits = [g for g in range(gpus - 1, 0, -1) if _splits(cfg, nodes * g)]
    fix = f"use --gpus-per-node {fits[0]}, or " if fits else ""
    try:
        dp = resolve_layout(cfg.parallel, nodes * gpus).dp
    except ConfigError as e:
        raise LaunchError(f"--gpus-per-node {gpus} on {nodes} nodes: {e}") from None
    batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_rank = f" in micro-batches of {micro}" if micro else ""
    raise LaunchError(
        f"--gpus-per-node {gpus} on {nodes} nodes makes {dp} data-parallel ranks, which "
        f"train.global_batch_size {batch} does not split over evenly{per_rank}; {fix}set train.global_batch_size "
        f"to a multiple of {dp * (micro or 1)} (--set train.global_batch_size=N)"
    )


def render(template: str, **values: str) -> str:
    """Fill a package template's `{{name}}` fields; every field must be given, and every value used."""
    text = resources.files("keel.launch").joinpath("templates", template).read_text(encoding="utf-8")
    missing = set(re.findall(r"\{\{(\w+)\}\}", text)) ^ set(values)
    if missing:
        raise ValueError(f"template {template}: fields {sorted(missing)} do not match")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)


def slurm_script(launch: Launch, time: str, partition: str | None, account: str | None) -> str:
    """An sbatch script: srun starts `keel train` on every node, preemption and time limits requeue the job."""
    workdir = Path.cwd()
    logs = (workdir / launch.cfg.run_dir / "logs").resolve()
    extra = [f"#SBATCH --partition={partition}"] * bool(partition) + [f"#SBATCH --account={account}"] * bool(account)
    return render(
        "slurm.sbatch",
        header=f"keel launch slurm {launch.config}: {launch.nodes} nodes x {launch.gpus} GPUs",
        job_name=launch.name,
        nodes=str(launch.nodes),
        gpus=str(launch.gpus),
        time=time,
        workdir=shlex.quote(str(workdir)),
        extra_directives="\n".join(extra),
        logs=shlex.quote(str(logs)),
        train=shlex.join(["keel", *launch.train_args(str(launch.config))]),
    )


def _container(launch: Launch, name: str, image: str, multi_node: list[str], env: list[dict]) -> dict[str, Any]:
    cfg, gpus = launch.cfg, launch.gpus
    # The exporters must listen beyond the pod's loopback for Prometheus to scrape them; the user's --set wins.
    observe = ["--set", "observe.prometheus=true", "--set", "observe.prometheus_host=0.0.0.0"]
    config = f"{CONFIG_DIR}/{launch.config.name}"
    args = launch.train_args(config)
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "workingDir": WORKDIR,
        "command": ["keel"],
        "args": [*args[:4], *multi_node, *observe, *args[4:]],
        "env": [*env, {"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "NCCL_DEBUG", "value": "WARN"}],
        "ports": [{"name": "rdzv", "containerPort": DEFAULT_PORT}]
        + [{"name": f"metrics-{r}", "containerPort": cfg.observe.prometheus_port + r} for r in range(gpus)],
        "volumeMounts": [
            {"name": "runs", "mountPath": WORKDIR},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},  # NCCL and the data loader need more than the default 64 MB
        ],
    }
    if cfg.train.device != "cpu":
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    return container


def _pod(launch: Launch, container: dict[str, Any], labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    port = launch.cfg.observe.prometheus_port
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
    return {
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            **spec,
            # Time for every rank to stop at one step and commit a checkpoint after the kubelet's SIGTERM.
            "terminationGracePeriodSeconds": 300,
            "containers": [container],
            "volumes": [
                {"name": "runs", "persistentVolumeClaim": {"claimName": f"{launch.name}-runs"}},
                {"name": "config", "configMap": {"name": f"{launch.name}-config"}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }


def _shared(launch: Launch, storage: str, storage_class: str | None, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The config as a ConfigMap and the run dir's volume (ReadWriteMany: every node writes the one run dir)."""
    claim: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": storage}}}
    if storage_class:
        claim["storageClassName"] = storage_class
    text = launch.config.read_text(encoding="utf-8")
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{launch.name}-config", labels),
         "data": {launch.config.name: text}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(f"{launch.name}-runs", labels),
         "spec": claim},
    ]  # fmt: skip


def _meta(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "labels": labels}


def _multi_node(nodes: int, node_rank: str, endpoint: str) -> list[str]:
    """keel train's multi-node flags; the container runtime fills in `$(VAR)` from the pod's environment."""
    return ["--nnodes", str(nodes), "--node-rank", node_rank, "--rdzv-endpoint", endpoint] if nodes > 1 else []


def k8s_objects(launch: Launch, kind: str, image: str, storage: str, storage_class: str | None) -> list[dict[str, Any]]:
    """The Kubernetes objects of a launch: ConfigMap, PVC, and an Indexed Job with its headless Service, or a
    Kubeflow PyTorchJob (whose operator makes the Service and sets RANK, MASTER_ADDR and MASTER_PORT)."""
    name, nodes = launch.name, launch.nodes
    labels = {"app.kubernetes.io/name": "keel", "keel.run": name}
    objects = _shared(launch, storage, storage_class, labels)
    if kind == "pytorchjob":
        flags = _multi_node(nodes, "$(RANK)", "$(MASTER_ADDR):$(MASTER_PORT)")
        container = _container(launch, "pytorch", image, flags, [])  # the container name the operator looks for
        container["ports"][0]["name"] = "pytorchjob-port"  # the port the operator's MASTER_PORT and Service use
        replica = {"restartPolicy": "ExitCode", "template": _pod(launch, container, labels)}  # 128+N: retried
        replicas = {"Master": {"replicas": 1, **replica}}
        if nodes > 1:
            replicas["Worker"] = {"replicas": nodes - 1, **replica}
        spec = {"runPolicy": {"backoffLimit": 3 * nodes}, "pytorchReplicaSpecs": replicas}
        return [*objects, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _meta(name, labels),
                           "spec": spec}]  # fmt: skip
    # An Indexed Job's pod i is host <name>-i in the Service's subdomain: pod 0 hosts the rendezvous.
    index = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    flags = _multi_node(nodes, "$(NODE_RANK)", f"{name}-0.{name}:{DEFAULT_PORT}")
    container = _container(launch, "keel", image, flags, [{"name": "NODE_RANK", "valueFrom": index}])
    rules = [
        # A Keel error (bad config, a crash loop) fails again however often it is retried.
        {"action": "FailJob", "onExitCodes": {"containerName": "keel", "operator": "In", "values": [2]}},
        # Preempted with a checkpoint, or evicted: the replacement pod continues the run; no retry is used up.
        {"action": "Ignore", "onExitCodes": {"containerName": "keel", "operator": "In", "values": PREEMPTED}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    job = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 3 * nodes,
        "podFailurePolicy": {"rules": rules},
        "template": _pod(launch, container, labels, restartPolicy="Never", subdomain=name),
    }
    service = {
        "clusterIP": "None",  # headless: DNS names the pods themselves
        "publishNotReadyAddresses": True,  # the rendezvous runs before any pod would count as ready
        "selector": labels,
        "ports": [{"name": "rdzv", "port": DEFAULT_PORT, "targetPort": DEFAULT_PORT}],
    }
    return [
        *objects,
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, labels), "spec": service},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, labels), "spec": job},
    ]


def to_yaml(value: Any, indent: int = 0) -> str:
    """YAML for nested dicts, lists and scalars: strings double-quoted (JSON's escapes), multi-line text as a block."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "\n".join(f"{pad}{_key(k)}:{_nested(v, indent)}" for k, v in value.items())
    if isinstance(value, list):
        if not value:
            return "[]"
        items = [to_yaml(v, indent + 2).lstrip() if isinstance(v, dict | list) else _scalar(v) for v in value]
        return "\n".join(f"{pad}- {item}" for item in items)
    return _scalar(value)


def _nested(value: Any, indent: int) -> str:
    if isinstance(value, dict | list) and value:
        return "\n" + to_yaml(value, indent + 2)
    if isinstance(value, str) and "\n" in value and _block_safe(value):
        body = "\n".join(f"{' ' * (indent + 2)}{line}" if line else "" for line in value.removesuffix("\n").split("\n"))
        return (" |\n" if value.endswith("\n") else " |-\n") + body
    return " " + to_yaml(value, indent)


def _block_safe(text: str) -> bool:
    # A literal block keeps every character but for trailing spaces, a leading space and stray line breaks.
    lines = text.removesuffix("\n").split("\n")
    return not text.startswith((" ", "\t")) and "\r" not in text and all(line == line.rstrip() for line in lines)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_./-]+", key) else json.dumps(key)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value))


def k8s_manifests(launch: Launch, kind: str, image: str, storage: str, storage_class: str | None) -> str:
    """The objects as one multi-document YAML stream for `kubectl apply -f -`."""
    head = f"# keel launch k8s {launch.config}: {launch.nodes} nodes x {launch.gpus} GPUs ({kind})\n"
    docs = [to_yaml(obj) for obj in k8s_objects(launch, kind, image, storage, storage_class)]
    return head + "\n---\n".join(docs) + "\n"
