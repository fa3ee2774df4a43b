"""Start N training processes on this machine under torchrun, and watch them: failures, signals, restarts.

torchrun restarts a failed worker group (`resilience.max_restarts`); its agent logs the first failure of each
attempt ("failed (exitcode: -9) local_rank: 1 ..."), which the launcher turns into a `worker_failed` event
naming the rank, its exit code or signal, and the step its progress file last showed. torchrun runs in its
own session, so a terminal's Ctrl-C reaches only `keel train`, which forwards it (and any preemption signal)
to the workers themselves: they agree on a step, commit a checkpoint there and exit, and the agent, whose
own shutdown would SIGKILL them after a grace period, is never signalled.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import psutil

from keel.errors import EXIT_REFUSED, LaunchError
from keel.io import filesystem_errors
from keel.launch.rendezvous import Nodes, rdzv_id
from keel.observe.events import EventLog
from keel.process import die_with_parent
from keel.resilience.watchdog import EXIT_HANG, read_progress
from keel.rundir import RunDir

WORKER_MODULE = "keel.train.worker"
# What torchrun's agent logs for the first failed worker of an attempt (torch.distributed.elastic, 1.9 to 2.13).
FAILURE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")


def under_launcher() -> bool:
    """True when a launcher started this process as one rank: torchrun, or one that sets RANK, WORLD_SIZE and
    LOCAL_RANK. A Kubeflow PyTorchJob pod has RANK and WORLD_SIZE of its own (the pod's place among the job's pods,
    not a process's): there `keel train` is its machine's launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def worker_env(nproc: int, run: RunDir) -> dict[str, str]:
    """Environment for the workers: threads split over the cores, rendezvous settings that survive restarts,
    and on CUDA the NCCL flight recorder, which dumps the last collectives of every rank into the run's logs
    when a collective times out."""
    env = dict(os.environ)
    env.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    env.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    env.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(run.logs / "nccl_trace_rank_"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # A shared rendezvous TCP store fails gloo re-initialisation after a restart (docs/torch-on-cpu.md).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    env["KEEL_LAUNCHER_PID"] = str(os.getpid())  # where an injected `sigterm` fault is sent, as a scheduler would
    return env


def torchrun_command(
    run_dir: Path, nproc: int, resume: bool, max_restarts: int, nodes: Nodes, join_timeout_s: float
) -> list[str]:
    """The torchrun command line that runs this machine's workers of `run_dir`.

    On several machines the agents meet in a c10d rendezvous at the endpoint (hosted by the agent on that host),
    under an id derived from the run dir, and coordinate every restart through it.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nodes.multi:
        cmd += [f"--nnodes={nodes.nnodes}", "--rdzv-backend=c10d"]
        cmd += [f"--rdzv-endpoint={nodes.endpoint}", f"--rdzv-id={rdzv_id(run_dir)}"]
        cmd += [f"--rdzv-conf=join_timeout={int(join_timeout_s)}"]
    else:
        cmd.append("--standalone")
    cmd += [f"--max-restarts={max_restarts}", "-m", WORKER_MODULE, str(run_dir)]
    return [*cmd, "--resume"] if resume else cmd


def describe_exit(code: int) -> str:
    """An exit code as people read it: `signal SIGKILL`, `hang (exit code 124)`, `exit code 1`."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return "hang (exit code 124)" if code == EXIT_HANG else f"exit code {code}"


class Workers:
    """A running torchrun with its workers: forwards signals to them, records their failures, waits."""

    def __init__(self, run_dir: Path, nproc: int, resume: bool, max_restarts: int, nodes: Nodes, join_timeout_s: float):
        self.run, self.nproc, self.nodes = RunDir(run_dir), nproc, nodes
        self.events = EventLog(self.run.events)
        cmd = torchrun_command(run_dir, nproc, resume, max_restarts, nodes, join_timeout_s)
        with filesystem_errors("write the launcher log", LaunchError):
            self.run.worker_error.unlink(missing_ok=True)  # an earlier attempt's, which this one must not report
            self._log: IO[str] = open(self.run.launcher_log(nodes.node_rank), "a", encoding="utf-8")
        linux = sys.platform.startswith("linux")
        self.process = subprocess.Popen(
            cmd,
            env=worker_env(nproc, self.run),
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent if linux else None,  # the agent (and so its workers) dies with us
        )
        self.failures: list[dict] = []
        self._reader = threading.Thread(target=self._read_stderr, name="keel-torchrun-log", daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._log.write(line)
            self._log.flush()
            found = FAILURE.search(line)
            if found:
                self._record_failure(int(found.group(1)), int(found.group(2)), int(found.group(3)))

    def _global_rank(self, local_rank: int, pid: int) -> int:
        """The failed worker's global rank: the rank whose progress file holds its pid on this host.

        The c10d rendezvous orders the agents by their address and pid, not by --node-rank, so node_rank * nproc
        + local_rank is only the guess for a worker that died before it wrote its progress file.
        """
        host = socket.gethostname().encode()[:32].decode(errors="replace")
        for rank in range(self.nodes.nnodes * self.nproc):
            record = read_progress(self.run.rank_progress(rank))
            if record and record["pid"] == pid and record["host"] == host:
                return rank
        return self.nodes.node_rank * self.nproc + local_rank

    def _record_failure(self, code: int, local_rank: int, pid: int) -> None:
        rank = self._global_rank(local_rank, pid)
        progress = read_progress(self.run.rank_progress(rank)) or {}
        failure = {
            "rank": rank,
            "exit": describe_exit(code),
            "exit_code": code,
            "step": progress.get("step"),
            "phase": progress.get("phase"),
            "log": str(self.run.rank_log(rank)),
        }
        self.failures.append(failure)
        self.events.incident("worker_failed", **failure)
        if code == EXIT_REFUSED and self.run.worker_error.exists():
            self.kill()  # a worker refused the run (a KeelError): every restart would refuse it again

    def worker_pids(self) -> list[int]:
        """The training processes torchrun started (not the agent)."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in children if _is_worker(c)]

    def forward(self, signum: int) -> None:
        """Send a signal to every worker (a preemption or a Ctrl-C they stop on gracefully)."""
        for pid in self.worker_pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """End torchrun and every worker at once (a second Ctrl-C)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        """Wait for torchrun to end (signals keep arriving meanwhile) and return its exit code."""
        code = self.process.wait()
        self._reader.join()
        self._log.close()
        return code


def _is_worker(process: psutil.Process) -> bool:
    try:
        cmd = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return WORKER_MODULE in cmd and "torch.distributed.run" not in cmd  # the agent's command names it too


def worker_error(run_dir: Path) -> str | None:
    """The one-line KeelError message a worker stopped with, or None if none did."""
    try:
        return RunDir(run_dir).worker_error.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
