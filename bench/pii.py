"""PII scrubbing: per-label recall and character precision on the labelled set, and MB/s on one core.

The labelled set is tests/data/pii_labelled.jsonl (tests/pii_labelled.py writes it; docs/pii.md explains it).
Throughput is keel.data.pii.scrub over, in one process: the machine's prose and code (the .md/.rst/.txt and .py
files bench/data_prepare.py reads, --megabytes of them: little PII, as in a pretraining corpus) and the labelled
set's text repeated to --megabytes (PII in every record: the worst case). Each figure is the median of --repeats.

With --presidio-python, Microsoft Presidio's AnalyzerEngine (its pattern recognizers; a blank spaCy pipeline, so
no NER model is needed) runs on the same records in its own environment, for the same figures side by side:

    python3 -m venv /tmp/presidio-venv && /tmp/presidio-venv/bin/pip install presidio-analyzer==2.2.366
    PYTHONPATH=src .venv/bin/python bench/pii.py --presidio-python /tmp/presidio-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_prepare import corpus  # noqa: E402

from keel.data.pii import find, scrub  # noqa: E402
from keel.data.pii_phone import numbers_in  # noqa: E402
from pii_labelled import PATH, evaluate  # noqa: E402

# Presidio's entity names for Keel's labels (its pattern recognizers; secrets it has none for).
PRESIDIO = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE_NUMBER",
    "IP_ADDRESS": "IP_ADDRESS",
    "CREDIT_CARD": "CREDIT_CARD",
    "IBAN_CODE": "IBAN",
    "US_SSN": "US_SSN",
}
PEER = """
import json, sys, time
import spacy
from presidio_analyzer import AnalyzerEngine
from presidio_analyzer.nlp_engine import SpacyNlpEngine
spacy.blank("en").to_disk("/tmp/presidio-blank-en")
engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "/tmp/presidio-blank-en"}])
analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])
entities = sys.argv[1].split(",")
texts = [json.loads(line)["text"] for line in sys.stdin]
t0 = time.perf_counter()
found = [[(r.start, r.end, r.entity_type) for r in analyzer.analyze(t, language="en", entities=entities)]
         for t in texts]
print(json.dumps({"seconds": time.perf_counter() - t0, "found": found}))
"""


def median_seconds(run, repeats: int) -> float:
    """The median wall-clock time of run()."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput(texts: list[str], repeats: int) -> float:
    """MB/s of scrub over the texts, in this one process (the phone validation's cache emptied each time)."""
    size = sum(len(t.encode()) for t in texts)

    def run() -> None:
        numbers_in.cache_clear()
        for text in texts:
            scrub(text)

    return size / 1e6 / median_seconds(run, repeats)


def _presidio(python: str, records: list[dict]) -> tuple[dict, float]:
    """Presidio's figures on the records and its MB/s (one process), from its own environment."""
    stdin = "".join(json.dumps({"text": r["text"]}) + "\n" for r in records)
    out = subprocess.run(
        [python, "-c", PEER, ",".join(PRESIDIO)], input=stdin, capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    answers = iter(result["found"])

    def presidio_find(_: str) -> list[tuple[int, int, str]]:
        return [(s, e, PRESIDIO[k]) for s, e, k in next(answers)]

    size = sum(len(r["text"].encode()) for r in records)
    return evaluate(records, presidio_find), size / 1e6 / result["seconds"]


def main() -> None:
    """Print the per-label figures and the MB/s."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presidio-python", help="a Python with presidio-analyzer installed")
    args = parser.parse_args()
    records = [json.loads(line) for line in PATH.read_text(encoding="utf-8").splitlines()]
    figures = evaluate(records, find)
    peer, peer_speed = _presidio(args.presidio_python, records) if args.presidio_python else ({}, None)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    spans = sum(len(r["spans"]) for r in records)
    print(f"labelled set: {len(records)} records, {spans} spans, {sum(not r['spans'] for r in records)} PII-free")
    print(
        f"{'label':14} {'spans':>6} {'recall':>7} {'char precision':>15}"
        + ("   Presidio recall, precision" * bool(peer))
    )
    for label, f in sorted(figures.items()):
        line = f"{label:14} {f['spans']:6.0f} {f['recall']:7.3f} {f['precision']:15.3f}"
        if peer:
            p = peer.get(label)
            line += f"   {p['recall']:.3f}, {p['precision']:.3f}" if p else "   (no recognizer)"
        print(line)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        natural = corpus(Path(tmp) / "c", args.megabytes)
    dense = [r["text"] for r in records]  # once: repeated, phone validations would come from the cache
    print(
        f"scrub, one process: prose and code {throughput(natural, args.repeats):.1f} MB/s, "
        f"labelled set (PII in most records) {throughput(dense, args.repeats):.1f} MB/s"
    )
    if peer_speed is not None:
        print(f"Presidio (pattern recognizers, one process) on the labelled set: {peer_speed:.2f} MB/s")


if __name__ == "__main__":
    main()
