"""`keel train`: preflight in this process, then train here or in N torchrun workers it watches and restarts."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from keel.checkpoint.commit import committed_steps
from keel.config import Config
from keel.config_toml import load_config
from keel.distributed.env import all_agree, init_distributed, shutdown
from keel.errors import KeelError, LaunchError
from keel.launch.rendezvous import Nodes, resolve_nodes
from keel.launch.torchrun import Workers, under_launcher, worker_error
from keel.observe.events import EventLog
from keel.observe.heartbeat import mark_state, read_status
from keel.observe.logs import setup_logging
from keel.resilience.goodput import process_started_at
from keel.rundir import RunDir
from keel.train.preflight import join_run, reopen_run, reopened, resolve, start_run
from keel.train.worker import run_worker

log = logging.getLogger("keel")
NodeFlags = tuple[int | None, int | None, str | None]  # --nnodes, --node-rank, --rdzv-endpoint as given


def prepare_run(
    config: Path | None, overrides: list[str], resume: Path | None, node_rank: int = 0
) -> tuple[Config, bool]:
    """Resolve the config and create (or reopen) the run dir; returns it and whether the run continues.

    Every node checks the config; node 0 alone writes the run dir, which the other nodes wait for (they cannot
    tell whether the run continues: their workers learn it from node 0's).
    """
    if resume is not None:
        if config is not None:
            raise KeelError("give either CONFIG or --resume RUN_DIR, not both (a run dir holds its own config)")
        if node_rank:
            return join_run(reopened(resume, overrides)), False
        return reopen_run(resume, overrides), True
    if config is None:
        raise KeelError("keel train needs a CONFIG file (e.g. configs/demo.toml) or --resume RUN_DIR")
    if node_rank:
        return join_run(resolve(load_config(config, overrides))), False
    return start_run(load_config(config, overrides))


def node_flags(config: Path | None, overrides: list[str], resume: Path | None, flags: NodeFlags) -> Nodes:
    """This machine's place: the flags, else Slurm's srun, else the config file's parallel.nnodes (not a resume's)."""
    nnodes, node_rank, endpoint = flags
    if nnodes is None and config is not None and resume is None and "SLURM_JOB_ID" not in os.environ:
        nnodes = load_config(config, overrides).parallel.nnodes
    return resolve_nodes(nnodes, node_rank, endpoint)


def train(
    config: Path | None,
    overrides: list[str],
    resume: Path | None,
    nproc: int | None,
    flags: NodeFlags = (None, None, None),
) -> int:
    """Run `keel train`; returns the exit code (0 finished, 128 + N preempted by signal N, 130 interrupted)."""
    # The goodput ledger counts start-up from the moment the command began.
    os.environ.setdefault("KEEL_LAUNCH_TIME", str(process_started_at()))
    if nproc is not None:
        overrides = [*overrides, f"parallel.nproc={nproc}"]
    if under_launcher():
        if any(flag is not None for flag in flags):
            raise LaunchError(
                "--nnodes/--node-rank/--rdzv-endpoint: this keel train already runs under a launcher that placed it "
                "(torchrun); give them to the launcher, or run keel train without one"
            )
        return _train_under_launcher(config, overrides, resume)
    nodes = node_flags(config, overrides, resume, flags)
    overrides = [*overrides, f"parallel.nnodes={nodes.nnodes}"]
    cfg, continuing = prepare_run(config, overrides, resume, nodes.node_rank)
    if cfg.parallel.world_size > 1:
        return supervise(cfg, continuing, nodes)
    env = init_distributed(cfg.train.device, cfg.distributed.timeout_s)
    run_worker(cfg.run_dir, env, continuing)
    return exit_code(read_status(cfg.run_dir))


def exit_code(status: dict) -> int:
    """The command's exit code for how the run ended: 0, 128 + the signal of a preemption, 130 for Ctrl-C."""
    state, reason = status.get("state"), str(status.get("reason") or "")
    if state == "preempted":
        name = reason.partition("(")[2].rstrip(")")
        return 128 + getattr(signal, name, signal.SIGTERM)
    if state == "stopped" and reason.startswith("interrupted"):
        return 130
    return 0


def supervise(cfg: Config, continuing: bool, nodes: Nodes) -> int:
    """Run the workers under torchrun, forwarding signals to them, until they finish, stop, or cannot go on.

    When torchrun has used up its restarts but the run committed a newer checkpoint meanwhile, it is launched
    again: only a run that fails without progress (a crash loop) stops by itself. On several machines every
    node's `keel train` does this for its own workers, and the agents restart together through the rendezvous.
    """
    run, resilience = RunDir(cfg.run_dir), cfg.resilience
    caught: list[int] = []
    while True:
        newest, launched = (committed_steps(run.checkpoints) or [0])[-1], time.time()
        workers = Workers(
            run.root, cfg.parallel.nproc, continuing, resilience.max_restarts, nodes, cfg.distributed.join_timeout_s
        )

        def forward(signum: int, frame: object, workers: Workers = workers) -> None:
            if signum == signal.SIGINT and signal.SIGINT in caught:
                workers.kill()  # the second Ctrl-C: stop now
                return
            caught.append(signum)
            workers.forward(signum)

        handled = {*resilience.preempt_signals, "SIGINT"}
        previous = {name: signal.signal(getattr(signal, name), forward) for name in handled}
        try:
            code = workers.wait()
        finally:
            for name, handler in previous.items():
                signal.signal(getattr(signal, name), handler)
        status = read_status(run.root)
        # The workers' own account, whatever torchrun's code (its agent exits non-zero when it was signalled).
        if status.get("state") in ("finished", "stopped", "preempted") and status.get("updated_at", 0) > launched:
            return exit_code(status)
        message = worker_error(run.root)
        if message is not None:
            raise KeelError(message)  # the worker's own one line, as if this process had raised it
        if caught:
            mark_state(run.root, "stopped", reason=f"signal {signal.Signals(caught[0]).name} during a failure")
            return 128 + caught[0]
        failures = workers.failures
        progressed = (committed_steps(run.checkpoints) or [0])[-1] > newest
        if failures and progressed and resilience.max_restarts and not _crash_loop(failures, resilience.max_restarts):
            EventLog(run.events).incident("relaunch", after_failures=len(failures), checkpoint_step=newest)
            log.warning(f"torchrun used up its {resilience.max_restarts} restarts; the run progressed, so again")
            continuing = True
            continue
        raise _failed(run, code, failures, resilience.max_restarts, run.launcher_log(nodes.node_rank))


def _crash_loop(failures: list[dict], max_restarts: int) -> bool:
    """Whether the newest `max_restarts` failures all happened at one step."""
    last = failures[-max_restarts:]
    return len(last) == max_restarts and len({f["step"] for f in last}) == 1


def _failed(run: RunDir, code: int, failures: list[dict], max_restarts: int, launcher_log: Path) -> LaunchError:
    """The one line for a run that stops failing: a crash loop names its step and the rank's log."""
    error = f"training failed (exit code {code})"
    if failures:
        last = failures[-1]
        where = f"rank {last['rank']} ({last['exit']}) at step {last['step']}"
        if max_restarts and _crash_loop(failures, max_restarts):
            error = f"crash loop: {where}, {max_restarts} times in a row"
        else:
            error = f"training failed: {where}"
        error += f"; see {last['log']} and {launcher_log}"
    else:
        error += f"; see {launcher_log} and {run.logs}/rank*.log"
    if read_status(run.root).get("state") not in ("crashed", "stopped"):
        mark_state(run.root, "crashed", error=error)
    return LaunchError(error)


def _train_under_launcher(config: Path | None, overrides: list[str], resume: Path | None) -> int:
    """Every rank runs this under an external torchrun: rank 0 prepares the run dir, then all train."""
    env = init_distributed("auto")
    # Per machine, as torchrun says (LOCAL_WORLD_SIZE); the world as nodes of that many, where it splits so.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    nodes, nproc = (env.world_size // local, local) if env.world_size % local == 0 else (1, env.world_size)
    overrides = [*overrides, f"parallel.nproc={nproc}", f"parallel.nnodes={nodes}"]
    cfg, error, continuing = None, None, False
    if env.is_main:
        try:
            cfg, continuing = prepare_run(config, overrides, resume)
        except KeelError as e:
            error = e
    if not all_agree(error is None):
        if error is not None:
            raise error
        shutdown(2)
    continuing = not all_agree(not continuing)  # rank 0 knows; every rank must restore alike
    run_dir = cfg.run_dir if cfg else (resume or load_config(config, overrides).run_dir)
    code = 0
    try:
        run_worker(Path(run_dir), env, continuing)
    except KeelError as e:
        setup_logging(None, env.rank)
        logging.getLogger("keel").error(f"keel: error: {e}")
        code = 2
    shutdown(code)
    return code
