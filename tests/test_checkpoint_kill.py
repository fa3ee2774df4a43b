"""SIGKILL at random moments during saves: resume always finds the newest committed checkpoint intact.

The trials run in a driver process (this file run as a script) that forks each training process
from an interpreter with torch already imported, so a trial costs its training time rather than a
fresh interpreter's start; the killed processes are real `keel train` processes and their groups.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def newest_committed(run: Path) -> int | None:
    from keel.checkpoint.commit import committed_steps

    steps = committed_steps(run / "checkpoints")
    return steps[-1] if steps else None


def check_committed_intact(run: Path) -> list[int]:
    """Every committed checkpoint verifies against its record (sizes and checksums); returns their steps."""
    from keel.checkpoint.commit import committed_steps, read_commit, verify_files

    steps = committed_steps(run / "checkpoints")
    for step in steps:
        path = run / "checkpoints" / f"step_{step}"
        verify_files(path, read_commit(path))
    return steps


def start_fork(args: list[str], log: Path) -> int:
    """Fork a `keel ARGS` process in its own process group (torch is already imported here); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from keel.cli import main

        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os._exit(code)


def start_popen(args: list[str], log: Path) -> int:
    """Start `python -m keel ARGS` (torchrun and its workers) in its own process group; returns its pid."""
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "keel", *args], stdout=out, stderr=out, start_new_session=True)
    POPENS[proc.pid] = proc  # Popen reaps its own children: wait through it
    return proc.pid


POPENS: dict[int, subprocess.Popen] = {}


def exit_code(pid: int) -> int:
    """Wait for a child started here and return its exit code."""
    if pid in POPENS:
        return POPENS.pop(pid).wait()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def kill_job(pid: int) -> None:
    """SIGKILL a training job: the launcher's process group and every descendant (torchrun starts each worker
    in a session of its own, so killing the launcher's group alone would leave the workers training)."""
    import psutil

    job = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    os.killpg(pid, signal.SIGKILL)
    for proc in job[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    exit_code(pid)
    psutil.wait_procs(job[1:], timeout=30)


def uncommitted_dirs(run: Path) -> list[str]:
    """Checkpoint directories without a commit record: the remains of interrupted saves."""
    return [d.name for d in (run / "checkpoints").glob("step_*") if not (d / "commit.json").exists()]


def wait_for_start(run: Path, seen: int, pid: int, log: Path, timeout: float = 300.0) -> None:
    """Wait until the attempt has restored and started training (its "start" event), so each trial trains."""
    import psutil

    deadline = time.monotonic() + timeout
    while not any(e["event"] == "start" for e in events(run)[seen:]):
        launcher = psutil.Process(pid)
        exited = launcher.status() == psutil.STATUS_ZOMBIE
        assert not exited and time.monotonic() < deadline, f"the training did not start: {log.read_text()[-3000:]}"
        time.sleep(0.02)


def events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def drive(root: Path, config: Path, trials: int, nproc: int, delay: tuple[float, float], seed: int) -> dict:
    """Kill `trials` training attempts at random moments, checking the invariants after each; then finish."""
    import keel.train.trainer  # noqa: F401  (imported before forking, so each trial starts fast)

    rng = random.Random(seed)
    run, log = root / "runs" / "kill", root / "kill.log"
    start = start_fork if nproc == 1 else start_popen
    mid_save, resumes, expected = 0, [], 0
    for trial in range(trials):
        before, seen = newest_committed(run), len(events(run))
        expected += before is not None
        args = ["train", "--resume", str(run)] if (run / "config.toml").exists() else ["train", str(config)]
        # Alternate synchronous and asynchronous saves: both must commit atomically.
        args += ["--nproc", str(nproc), "--set", f"checkpoint.async_save={'true' if trial % 2 else 'false'}"]
        uncommitted = set(uncommitted_dirs(run))
        pid = start(args, log)
        wait_for_start(run, seen, pid, log)
        time.sleep(rng.uniform(*delay))  # a random moment of training, most of which is saving
        kill_job(pid)
        committed = check_committed_intact(run) if (run / "checkpoints").exists() else []
        after = committed[-1] if committed else None
        assert before is None or (after is not None and after >= before), (trial, before, after)
        mid_save += bool(set(uncommitted_dirs(run)) - uncommitted)
        for event in events(run)[seen:]:
            if event["event"] == "resume":
                # The newest committed checkpoint, never something half-written and never an older one.
                assert event["step"] == before, (trial, event, before)
                resumes.append(event["step"])
    final = (newest_committed(run) or 0) + 2
    for name, args in (("kill", ["train", "--resume", str(run)]), ("ref", ["train", str(config)])):
        extra = ["--nproc", str(nproc), "--set", f"train.stop_after={final}", "--set", f'run.name="{name}"']
        assert exit_code(start([*args, *extra], root / f"{name}.log")) == 0, (root / f"{name}.log").read_text()[-3000:]
    return {"mid_save_kills": mid_save, "resumes": resumes, "expected_resumes": expected, "final_step": final}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def kill_trials(tmp_path: Path, dataset: Path, nproc: int, trials: int, delay: tuple[float, float]) -> dict:
    from conftest import tiny_config

    config = tiny_config(
        tmp_path / "kill.toml",
        dataset,
        run={"name": "kill", "seed": 0},
        train={"steps": 1000},
        checkpoint={"every": 1, "keep": 2},
        observe={"console": False},
    )
    cmd = [sys.executable, __file__, str(tmp_path), str(config), str(trials), str(nproc), *map(str, delay)]
    # One thread per process: on a shared 2-core machine, oversubscribed threads make a tiny step 10x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    kill, ref = losses(tmp_path / "runs" / "kill"), losses(tmp_path / "runs" / "ref")
    assert len(kill) == len(ref) == summary["final_step"]
    return summary | {"kill_losses": kill, "ref_losses": ref}


def test_sigkill_during_saves_never_loads_a_partial_checkpoint_and_loses_only_uncommitted_steps(tmp_path, dataset):
    # With a checkpoint every step, a tiny model spends most of each ~0.1 s step saving: most kills land in a save.
    summary = kill_trials(tmp_path, dataset, nproc=1, trials=20, delay=(0.0, 1.0))
    assert summary["kill_losses"] == summary["ref_losses"]  # one process: bit for bit after 20 kills
    assert len(summary["resumes"]) == summary["expected_resumes"] >= 15 and summary["mid_save_kills"] >= 5, summary


@pytest.mark.soak
def test_sigkill_of_a_two_process_group_during_saves_keeps_the_newest_commit(tmp_path, dataset):
    summary = kill_trials(tmp_path, dataset, nproc=2, trials=20, delay=(0.0, 2.0))
    assert summary["kill_losses"] == pytest.approx(summary["ref_losses"], rel=1e-5)
    assert len(summary["resumes"]) == summary["expected_resumes"] >= 15 and summary["mid_save_kills"] >= 5, summary


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    root_dir, config_path, n_trials, n_proc, low, high = sys.argv[1:7]
    os.chdir(root_dir)
    out = drive(Path(root_dir), Path(config_path), int(n_trials), int(n_proc), (float(low), float(high)), seed=0)
    print(json.dumps(out))
