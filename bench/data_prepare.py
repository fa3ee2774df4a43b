"""Prepare throughput (MB/s per core) against the encoders alone and datatrove, on prose and code in 8 JSONL files.

The corpus: the machine's .md/.rst/.txt files (prose) and the venv's .py files (code), alternating, as 8 JSON Lines
files of --megabytes. One 8,192-token byte-level BPE is trained on it first (outside the timing) and used by every
pipeline. Each figure is the median of --repeats; every worker is one core (TOKENIZERS_PARALLELISM=false).

- encoders alone, one process: Hugging Face tokenizers `encode_batch_fast` (the floor before this benchmark's
  issue), and tiktoken on the same BPE (what prepare now encodes with; ids checked equal on every document);
- Keel's prepare with stages off and all on (NFC, min_words, repeated lines, symbol ratio, exact dedup, MinHash
  near dedup at 0.8, PII), with 1 worker and a pool of --workers;
- with --peer-python, datatrove's JsonlReader -> DocumentTokenizer on the same files and tokenizer, 1 and --workers
  workers. It runs in its own environment (not Keel's), set up as bench/datatrove_peer.py says:

    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install datatrove==0.10.1 tokenizers==0.23.3 orjson
    PYTHONPATH=src .venv/bin/python bench/data_prepare.py --peer-python /tmp/bench-venv/bin/python

"MB/s per core" is MB/s divided by the processes that ran; the machine ceiling (a pure-Python loop in a pool of
--workers over 1 process) says how much of a second core the shared machine gave during the run.
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, for every pipeline here

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from keel.data.prepare import prepare_dataset  # noqa: E402
from keel.data.stages import StageSettings  # noqa: E402
from keel.data.tokenizer import Encoder  # noqa: E402

ALL_ON = StageSettings(
    normalize="NFC",
    min_words=5,
    max_repeated_line_fraction=0.9,
    max_symbol_ratio=0.9,
    dedup_exact=True,
    dedup_near_threshold=0.8,
    pii=True,
)


def _texts(roots: list[Path], suffixes: tuple[str, ...]) -> list[str]:
    out = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix in suffixes and path.is_file() and 2000 <= path.stat().st_size <= 2_000_000:
                try:
                    out.append(path.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, OSError):
                    continue
    return out


def corpus(root: Path, megabytes: float) -> list[str]:
    """Prose and code alternating, dealt round-robin into 8 JSON Lines files of `megabytes` in all."""
    prose = _texts([Path("/usr/share"), Path(sys.prefix)], (".md", ".rst", ".txt"))
    code = _texts([Path(sys.prefix)], (".py",))
    docs, size = [], 0
    while size < megabytes * 1e6:
        for source in (prose, code):
            docs.append(source[len(docs) // 2 % len(source)])
            size += len(docs[-1].encode())
    root.mkdir(parents=True)
    for k in range(8):
        (root / f"{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[k::8]))
    return docs


def median_seconds(run: Callable[[int], None], repeats: int) -> float:
    """The median wall-clock time of run(repeat)."""
    seconds = []
    for r in range(repeats):
        t0 = time.perf_counter()
        run(r)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process only: not the pool's workers
    return usage.ru_utime + usage.ru_stime


def _spin(n: int) -> int:
    return sum(i * i for i in range(n))


def ceiling(workers: int, repeats: int) -> float:
    """How much faster a pure-Python loop runs in a pool of `workers` than in 1 process: the machine's own limit."""
    ctx = multiprocessing.get_context("forkserver")
    rates = {}
    for n in (1, workers):
        with ctx.Pool(n) as pool:
            pool.map(_spin, [1] * n)  # start the processes outside the timing
            rates[n] = 1 / median_seconds(lambda _: pool.map(_spin, [2_000_000] * 2 * workers), repeats)
    return rates[workers] / rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=36.6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size (default: every core)")
    parser.add_argument("--peer-python", help="python of an environment with datatrove (see the docstring)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = corpus(root / "raw", args.megabytes)
        mb = sum(len(d.encode()) for d in docs) / 1e6
        prepare_dataset([str(root / "raw" / "*.jsonl")], root / "tok", vocab_size=8192, log=lambda m: None)
        tok = root / "tok" / "tokenizer.json"
        rows: dict[str, tuple[float, int]] = {}  # name -> (MB/s, processes)
        main_cpu: dict[str, float] = {}  # Keel with a pool: the main process's CPU seconds per wall second
        hf, fast = Encoder(tok, False), Encoder(tok, True)
        assert all(a.tolist() == b.tolist() for a, b in zip(hf.encode(docs), fast.encode(docs), strict=True))
        for name, encoder in (("HF tokenizers encode_batch_fast alone", hf), ("tiktoken alone (same ids)", fast)):
            rows[name] = (mb / median_seconds(lambda _, e=encoder: e.encode(docs), args.repeats), 1)
        for label, stages in (("stages off", StageSettings()), ("all stages on", ALL_ON)):
            for workers in (1, args.workers):

                def run(r: int, stages: StageSettings = stages, workers: int = workers, label: str = label) -> None:
                    out = root / f"{label}-{workers}-{r}".replace(" ", "_")
                    prepare_dataset(
                        [str(root / "raw" / "*.jsonl")],
                        out,
                        tokenizer=str(tok),
                        stages=stages,
                        workers=workers,
                        log=lambda m: None,
                    )

                cpu0 = _cpu()
                seconds = median_seconds(run, args.repeats)
                rows[f"Keel, {label}, {workers} worker(s)"] = (mb / seconds, workers)
                if workers > 1:
                    main_cpu[label] = (_cpu() - cpu0) / args.repeats / seconds
        if args.peer_python:
            peer = Path(__file__).with_name("datatrove_peer.py")
            for workers in (1, args.workers):

                def run_peer(r: int, workers: int = workers) -> None:
                    out = root / f"datatrove-{workers}-{r}"
                    argv = [args.peer_python, str(peer), str(root / "raw"), str(tok), str(out), str(workers)]
                    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ""})

                rows[f"datatrove reader -> tokenizer, {workers} worker(s)"] = (
                    mb / median_seconds(run_peer, args.repeats),
                    workers,
                )
        limit = ceiling(args.workers, args.repeats)
    print(f"{mb:.1f} MB in 8 JSON Lines files, medians of {args.repeats}")
    print("| pipeline | MB/s | MB/s per core | core-hours per TB |")
    print("| --- | --- | --- | --- |")
    for name, (rate, processes) in rows.items():
        print(f"| {name} | {rate:.2f} | {rate / processes:.2f} | {1e6 / (rate / processes) / 3600:.0f} |")
    per_core = {name: rate / processes for name, (rate, processes) in rows.items()}
    fastest = per_core["tiktoken alone (same ids)"]
    for name, rate in per_core.items():
        if name.startswith("Keel"):
            print(f"{name}: {rate / fastest:.2f}x tiktoken's per-core rate")
    for workers in (1, args.workers):
        peer_name = f"datatrove reader -> tokenizer, {workers} worker(s)"
        if peer_name in per_core:
            keel = per_core[f"Keel, stages off, {workers} worker(s)"]
            print(f"{workers} worker(s): Keel stages off / datatrove = {keel / per_core[peer_name]:.2f}x")
    for label in ("stages off", "all stages on"):
        one, pool = rows[f"Keel, {label}, 1 worker(s)"][0], rows[f"Keel, {label}, {args.workers} worker(s)"][0]
        print(f"{label}: pool of {args.workers} / 1 worker = {pool / one:.2f}x")
    print(f"machine ceiling: a pure-Python loop in a pool of {args.workers} / 1 process = {limit:.2f}x")
    for label, busy in main_cpu.items():
        print(
            f"{label}, pool of {args.workers}: the main process was busy {busy:.0%} of the time: it would keep up "
            f"with about {args.workers / max(busy, 1e-9):.0f} workers"
        )


if __name__ == "__main__":
    main()
