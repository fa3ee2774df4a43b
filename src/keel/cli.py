"""The `keel` command. A KeelError or a bad option becomes one line on stderr and exit code 2."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from keel.cli_data import SetOption, data_app
from keel.errors import EXIT_REFUSED, KeelError
from keel.process import Stopped, stop_on

app = typer.Typer(
    help="Keel: pretrain language models, from raw text to a trained, resumable checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data")
checkpoint_app = typer.Typer(help="Inspect a run's checkpoints.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(checkpoint_app, name="checkpoint")
launch_app = typer.Typer(help="Print what runs a training on a cluster.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(launch_app, name="launch")


def _print_config_keys() -> None:
    from keel.config import describe_keys
    from keel.models import MODELS

    for key, default, doc in describe_keys():
        print(f"{key:32} {default:>14}  {doc}")
    for name, spec in MODELS.items():
        for field, info in spec.args_cls.model_fields.items():
            default = repr(info.get_default(call_default_factory=True))
            print(f"{'model.' + field:32} {default:>14}  ({name}) {info.description or ''}")


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="TOML config file (see configs/).")] = None,
    overrides: SetOption = None,
    nproc: Annotated[int | None, typer.Option(help="Processes to launch (sets parallel.nproc).", min=1)] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this run dir from its newest checkpoint.")
    ] = None,
    help_config: Annotated[bool, typer.Option("--help-config", help="List every config key with its doc.")] = False,
    nnodes: Annotated[
        int | None, typer.Option(help="Machines the run spans, each starting --nproc processes (Slurm: SLURM_NNODES).")
    ] = None,
    node_rank: Annotated[
        int | None, typer.Option(help="This machine's number from 0; node 0 creates the run dir (Slurm: SLURM_NODEID).")
    ] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT of the c10d rendezvous on node 0 (Slurm: the job's first host:29500).")
    ] = None,
) -> None:
    """Train a model: keel train CONFIG [--set k=v ...] [--nproc N], or keel train --resume RUN_DIR."""
    if help_config:
        _print_config_keys()
        return
    from keel.launch.train import train as run_train

    raise typer.Exit(run_train(config, overrides or [], resume, nproc, (nnodes, node_rank, rdzv_endpoint)))


ConfigArgument = Annotated[Path, typer.Argument(help="TOML config file (see configs/).")]
NodesOption = Annotated[int, typer.Option(help="Machines to train on.", min=1)]
GpusOption = Annotated[
    int | None, typer.Option(help="GPUs (processes) per machine; default: the config's parallel.nproc.", min=1)
]


@launch_app.command("slurm")
def launch_slurm(
    config: ConfigArgument,
    nodes: NodesOption,
    gpus_per_node: GpusOption = None,
    overrides: SetOption = None,
    time: Annotated[str, typer.Option(help="The job's time limit (#SBATCH --time).")] = "24:00:00",
    partition: Annotated[str | None, typer.Option(help="Slurm partition (#SBATCH --partition).")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account (#SBATCH --account).")] = None,
) -> None:
    """Print an sbatch script: srun starts keel train on every node; preemption requeues the job, which continues."""
    from keel.launch.manifests import plan, slurm_script

    print(slurm_script(plan(config, overrides or [], nodes, gpus_per_node), time, partition, account), end="")


@launch_app.command("k8s")
def launch_k8s(
    config: ConfigArgument,
    nodes: NodesOption,
    gpus_per_node: GpusOption = None,
    overrides: SetOption = None,
    kind: Annotated[str, typer.Option(help="job (Indexed Job + headless Service) or pytorchjob (Kubeflow).")] = "job",
    image: Annotated[str, typer.Option(help="Container image with keel installed.")] = "keel:latest",
    storage: Annotated[str, typer.Option(help="Size of the run-dir volume (a ReadWriteMany PVC).")] = "500Gi",
    storage_class: Annotated[str | None, typer.Option(help="StorageClass of the run-dir volume.")] = None,
) -> None:
    """Print Kubernetes manifests: the config, a run-dir PVC and an Indexed Job (or PyTorchJob) of keel train."""
    from keel.launch.manifests import k8s_manifests, plan

    if kind not in ("job", "pytorchjob"):
        raise KeelError(f"--kind {kind!r}: choose job (an Indexed Job) or pytorchjob (a Kubeflow PyTorchJob)")
    launch = plan(config, overrides or [], nodes, gpus_per_node)
    print(k8s_manifests(launch, kind, image, storage, storage_class), end="")


@checkpoint_app.command("verify")
def checkpoint_verify(
    run_dir: Annotated[Path, typer.Argument(help="Run directory whose checkpoints to check.")],
) -> None:
    """Check every checkpoint's files against its commit record (sizes, SHA-256); exit 2 if any is corrupt."""
    from keel.checkpoint.commit import verify_run

    lines, ok = verify_run(run_dir)
    print("\n".join(lines))
    if not ok:
        raise typer.Exit(2)


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with a committed checkpoint.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def ",
    tokens: Annotated[int, typer.Option(help="Most new tokens to sample.", min=1)] = 100,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.", min=0)] = 0.8,
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Sample a continuation of a prompt from a trained run."""
    from keel.eval.generate import sample_text

    print(sample_text(run_dir, prompt, tokens, temperature=temperature, step=step, seed=seed))


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to report on.")],
    stall_timeout: Annotated[
        float | None, typer.Option(help="Seconds without a heartbeat before a run counts as stalled.", min=0)
    ] = None,
) -> None:
    """Show whether a run is running, stalled, finished, stopped or crashed, and its recent incidents."""
    from keel.config_toml import load_config
    from keel.observe.status_view import describe_run
    from keel.rundir import RunDir

    run = RunDir(run_dir)
    if stall_timeout is None and run.is_run():
        stall_timeout = load_config(run.config).observe.stall_timeout_s
    print(describe_run(run_dir, stall_timeout or 600.0))


@app.command()
def goodput(run_dir: Annotated[Path, typer.Argument(help="Run directory to account for.")]) -> None:
    """Where every second of a run's wall time went, across restarts and resumes, and its goodput ratio."""
    from keel.config_toml import load_config
    from keel.observe.heartbeat import read_status
    from keel.observe.status_view import run_state
    from keel.resilience.goodput import ledger_lines
    from keel.rundir import RunDir

    run = RunDir(run_dir).require()
    timeout = load_config(run.config).observe.stall_timeout_s
    print("\n".join(ledger_lines(run, running=run_state(read_status(run.root), timeout) == "running")))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with a committed checkpoint.")],
    out: Annotated[Path, typer.Option(help="Directory to write; it must not exist or be empty.")],
    fmt: Annotated[str, typer.Option("--format", help="Export format: hf (Hugging Face safetensors).")] = "hf",
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
) -> None:
    """Export a run's checkpoint: --format hf writes model.safetensors, config.json and the tokenizer files."""
    from keel.checkpoint.hf import export_hf

    print(f"exported {run_dir} to {export_hf(run_dir, out, step=step, fmt=fmt)}")


@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with a committed checkpoint.")],
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
    batches: Annotated[
        int | None, typer.Option(help="Global batches of validation data (default: train.eval_batches).", min=1)
    ] = None,
    harness: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated lm-evaluation-harness tasks: Keel's own (keel_python_syntax), task YAML files, "
            "or lm-eval task names; run on the Hugging Face export."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Most examples per harness task.", min=1)] = None,
) -> None:
    """Validation loss and perplexity per source and mixture dataset (and harness tasks); writes RUN_DIR/eval.json."""
    from keel.eval.evaluate import eval_lines, evaluate_run
    from keel.rundir import RunDir

    tasks = [t.strip() for t in harness.split(",") if t.strip()] if harness is not None else None
    if tasks == []:
        raise KeelError("--harness: no task named; e.g. --harness keel_python_syntax")
    record = evaluate_run(run_dir, step, batches, tasks, limit)
    print("\n".join([*eval_lines(record), f"wrote {RunDir(run_dir).eval_results}"]))


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with a committed checkpoint.")],
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: newest).")] = None,
    templates: Annotated[
        Path | None, typer.Option(help="Template file (default: the templates Keel ships; format in its README).")
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the templates.", min=100)] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Bias audit: log-likelihood gap per demographic axis with bootstrap intervals; writes RUN_DIR/audit.json."""
    from keel.eval.audit import audit_lines, audit_run
    from keel.rundir import RunDir

    record = audit_run(run_dir, step, str(templates) if templates else None, bootstrap, seed)
    print("\n".join([*audit_lines(record), f"wrote {RunDir(run_dir).audit_results}"]))


@app.command()
def card(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with a committed checkpoint.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Record a card.* key (or observe.price_per_device_hour, grid_gco2_per_kwh) first."),
    ] = None,
) -> None:
    """Write RUN_DIR/model_card.md: model, training, hardware, energy, cost, evaluation, data, intended use."""
    from keel.observe.card import write_model_card

    print(f"wrote {write_model_card(run_dir, overrides or [])}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="Run directory to report on.")]) -> None:
    """Write RUN_DIR/report.html, the run's front page: summary, plots, incident timeline, evaluation, audit."""
    from keel.observe.report import write_report

    print(f"wrote {write_report(run_dir)}")


@app.command()
def plan(
    config: ConfigArgument,
    overrides: SetOption = None,
    nproc: Annotated[int | None, typer.Option(help="Processes per machine (sets parallel.nproc).", min=1)] = None,
    nnodes: Annotated[int | None, typer.Option(help="Machines (sets parallel.nnodes).", min=1)] = None,
    device: Annotated[
        str | None, typer.Option(help="Plan for h100, h200, a100 or cpu (default: this machine's GPU, else its CPU).")
    ] = None,
    price_per_device_hour: Annotated[
        float | None,
        typer.Option(help="USD per device-hour for the cost (default: observe.price_per_device_hour).", min=0),
    ] = None,
    search_layouts: Annotated[
        bool, typer.Option("--search", help="Also list the fastest layouts of these devices that fit.")
    ] = False,
) -> None:
    """Before training: per-rank memory, step time, tokens/day, time, device-hours, cost and energy of a config."""
    from keel.config_toml import load_config
    from keel.plan.devices import KINDS
    from keel.train.planning import plan_command

    if device is not None and device not in KINDS:
        raise KeelError(f"--device {device!r}: choose one of {', '.join(KINDS)}")
    extra = list(overrides or [])
    extra += [f"parallel.nproc={nproc}"] if nproc else []
    extra += [f"parallel.nnodes={nnodes}"] if nnodes else []
    lines, refused = plan_command(load_config(config, extra), device, price_per_device_hour, search_layouts)
    print("\n".join(lines))
    if refused:
        raise KeelError(refused)


@app.command()
def demo(
    overrides: SetOption = None,
    nproc: Annotated[int, typer.Option(help="Processes to train with.", min=1)] = 2,
) -> None:
    """The embedded default: prepare the Python standard library, train, evaluate and sample, in runs/demo/."""
    from keel.launch.demo import run_demo

    run_demo(overrides or [], nproc)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app and turns user errors into one line and exit code 2."""
    command = typer.main.get_command(app)
    try:
        # Ctrl-C and a scheduler's or `kill`'s stop unwind alike: pools end, work is kept, one line says so. (Typer
        # would turn Ctrl-C's KeyboardInterrupt into a silent exit 130; `keel train` forwards both to its workers.)
        with stop_on(signal.SIGTERM, signal.SIGINT):
            code = command.main(args=argv, prog_name="keel", standalone_mode=False)
    except KeelError as e:
        print(f"keel: error: {e}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    except Stopped as e:
        print(f"keel: stopped by {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except typer.Abort:
        print("keel: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # typer's usage errors: bad option, value or command
        ctx = getattr(e, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"keel: error: {e.format_message()}{where}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
