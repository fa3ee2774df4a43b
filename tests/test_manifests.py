"""`keel launch slurm` and `keel launch k8s`: what they print parses, validates against the Kubernetes schema offline,
and refuses a layout the config cannot train. (The sbatch script runs end to end in tests/test_multinode.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import assert_one_line_error, run_keel, tiny_config
from keel.launch.manifests import to_yaml

K8S_VERSION = "1.37.0"


def launch(tmp_path: Path, dataset: Path, *args: str) -> str:
    cfg = tiny_config(tmp_path / "cfg.toml", dataset, run={"name": "Big_Run.1"})
    result = run_keel("launch", *args[:1], str(cfg), *args[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(text: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text) if doc}


def validate(obj: dict) -> None:
    """Strict: an unknown field anywhere fails, as `kubectl apply --validate=strict` would."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_sbatch_script_parses_and_carries_the_preemption_recipe(tmp_path, dataset):
    script = launch(tmp_path, dataset, "slurm", "--nodes", "4", "--gpus-per-node", "2", "--set", "optim.lr=1e-3",
                    "--partition", "gpu", "--time", "2:00:00")  # fmt: skip
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    for directive in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=2", "--time=2:00:00", "--signal=B:USR1@120",
                      "--requeue", "--partition=gpu", "--job-name=big-run-1", f"--chdir={tmp_path}"):  # fmt: skip
        assert f"#SBATCH {directive}" in script, directive
    train = f"keel train {tmp_path / 'cfg.toml'} --nproc 2 --set optim.lr=1e-3 &"
    assert train in script and "srun --nodes=4 --ntasks-per-node=1" in script
    assert f"--output={tmp_path}/runs/Big_Run.1/logs/node%n.log" in script
    assert 'trap \'signalled=1; kill -USR1 "$child"' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_an_indexed_job_validates_and_its_pieces_refer_to_each_other(tmp_path, dataset):
    text = launch(tmp_path, dataset, "k8s", "--nodes", "4", "--gpus-per-node", "2", "--image", "reg/keel:1")
    found = objects(text)
    assert set(found) == {"ConfigMap", "PersistentVolumeClaim", "Service", "Job"}
    for obj in found.values():
        validate(obj)
    job, service, claim = found["Job"], found["Service"], found["PersistentVolumeClaim"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    pod = job["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None" and pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    [container] = pod["spec"]["containers"]
    args = container["args"]
    name = job["metadata"]["name"]
    assert name == "big-run-1" and args[args.index("--rdzv-endpoint") + 1] == f"{name}-0.{name}:29500"
    assert args[args.index("--node-rank") + 1] == "$(NODE_RANK)" and args[args.index("--nnodes") + 1] == "4"
    rank = next(e for e in container["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in rank["valueFrom"]["fieldRef"]["fieldPath"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    config = found["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    assert config["data"]["cfg.toml"] == (tmp_path / "cfg.toml").read_text()
    assert args[1] == "/etc/keel/cfg.toml"
    rules = {rule["action"]: rule for rule in job["spec"]["podFailurePolicy"]["rules"] if "onExitCodes" in rule}
    assert rules["Ignore"]["onExitCodes"]["values"] == [138, 143]  # preempted with a checkpoint: no retry used up
    assert rules["FailJob"]["onExitCodes"]["values"] == [2]  # a Keel error fails however often it is retried


def test_a_pytorchjob_has_a_master_and_workers_whose_pods_validate(tmp_path, dataset):
    found = objects(launch(tmp_path, dataset, "k8s", "--nodes", "2", "--kind", "pytorchjob"))
    assert set(found) == {"ConfigMap", "PersistentVolumeClaim", "PyTorchJob"}
    validate(found["ConfigMap"])
    validate(found["PersistentVolumeClaim"])
    replicas = found["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]
    assert {role: spec["replicas"] for role, spec in replicas.items()} == {"Master": 1, "Worker": 1}
    for spec in replicas.values():  # the custom resource has no schema here; its pods are core objects
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "p"}, "template": spec["template"]})
        [container] = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch" and container["ports"][0]["name"] == "pytorchjob-port"
        args = container["args"]
        assert args[args.index("--rdzv-endpoint") + 1] == "$(MASTER_ADDR):$(MASTER_PORT)"
        assert args[args.index("--nproc") + 1] == "1"  # the config's parallel.nproc


@pytest.mark.parametrize("verb", ["slurm", "k8s"])
def test_more_gpus_per_node_than_the_batch_splits_over_is_one_line_with_the_fix(tmp_path, dataset, verb):
    cfg = tiny_config(tmp_path / "cfg.toml", dataset, train={"global_batch_size": 24})
    result = run_keel("launch", verb, str(cfg), "--nodes", "2", "--gpus-per-node", "8", cwd=tmp_path)
    assert_one_line_error(
        result,
        "--gpus-per-node 8 on 2 nodes makes 16 data-parallel ranks, which train.global_batch_size 24 does not split",
        "use --gpus-per-node 6, or set train.global_batch_size to a multiple of 16",
    )


def test_a_bad_kind_is_one_line(tmp_path, dataset):
    cfg = tiny_config(tmp_path / "cfg.toml", dataset)
    result = run_keel("launch", "k8s", str(cfg), "--nodes", "2", "--kind", "mpijob", cwd=tmp_path)
    assert_one_line_error(result, "--kind 'mpijob': choose job")


def test_yaml_output_reads_back_as_the_same_objects():
    tricky = {
        "plain": "yes",
        "quoted: key": ["no", "1.0", "", "a # b", 'say "hi"', "$(VAR)"],
        "numbers": [0, 1.5, True, False],
        "text": "line one\n\n  indented: two\n",
        "spaced": "trailing space \nnext",
        "empty": {},
        "nested": [{"a": {"b": [1, {"c": "d"}]}}, [], {}, [["x", "y"], "z"]],
    }
    assert yaml.safe_load(to_yaml(tricky)) == tricky


def test_a_pipelined_config_launches_before_its_vocabulary_is_known(tmp_path, dataset):
    # model.vocab_size 0 is taken from the dataset only by `keel train`: counting blocks must not need it.
    script = launch(tmp_path, dataset, "slurm", "--nodes", "2", "--gpus-per-node", "2", "--set", "parallel.pp=2")
    assert "--nproc 2 --set parallel.pp=2" in script
