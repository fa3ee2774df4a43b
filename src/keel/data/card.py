"""`keel data card`: data_card.md, a datasheet (Gebru et al., "Datasheets for Datasets") drawn from a dataset.

Every figure comes from the manifest (sources, licenses, stage counts, PII replacements, removals) or the
dataset's own files (document lengths, a language sample: keel.data.profile); nothing is typed by hand.
"""

from __future__ import annotations

import time
from pathlib import Path

from keel.data.licenses import restriction, terms
from keel.data.manifest import MANIFEST, Manifest, load_manifest, manifest_sha256
from keel.data.profile import document_bounds, languages, lengths
from keel.errors import DataError
from keel.io import atomic_write_text, filesystem_errors

DATA_CARD = "data_card.md"
DEDUP_STAGES = ("dedup_exact", "dedup_near", "merge.dedup_exact", "merge.dedup_near")


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A Markdown table; numbers get thousands separators."""

    def cell(value: object) -> str:
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _allowed(ok: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "**unknown**"}[ok]


def included_sources(manifest: Manifest) -> list:
    """The sources documents were read from (exclude globs, `!GLOB`, only remove files)."""
    return [s for s in manifest.sources if not s.glob.startswith("!")]


def license_flags(manifest: Manifest) -> list[str]:
    """One line per source whose license forbids commercial use or redistribution, or is unknown."""
    return [f"{s.glob}: {why}" for s in included_sources(manifest) if (why := restriction(s.license))]


def source_table(manifest: Manifest) -> list[str]:
    """Sources with their licenses, what those allow, and their sizes."""
    rows = []
    for s in included_sources(manifest):
        t = terms(s.license)
        rows.append([f"`{s.glob}`", s.license, t.kind, _allowed(t.commercial), _allowed(t.redistribution)])
        rows[-1] += [s.files, s.documents, s.bytes]
    header = ["source", "license", "kind", "commercial use", "redistribution", "files", "documents kept", "bytes"]
    return table(header, rows)


def stage_counts(manifest: Manifest, what: str) -> int:
    """Documents all stages dropped (`what` = "dropped") or changed."""
    return sum(stats.get(f"documents_{what}", 0) for stats in manifest.stages.values())


def pii_replacements(manifest: Manifest) -> dict[str, int]:
    """PII replacements per label (EMAIL, PHONE, ...), as the write pass counted them."""
    pii = manifest.stages.get("pii", {})
    return {key.split(".", 1)[1]: n for key, n in sorted(pii.items()) if key.startswith("replacements.")}


def summary_lines(root: Path, manifest: Manifest) -> list[str]:
    """The data card in a few lines, for the model card (which flags licenses itself): size, sources, stages."""
    splits = ", ".join(
        f"{name} {e.tokens:,} tokens in {e.documents:,} documents" for name, e in manifest.splits.items()
    )
    sources = ", ".join(f"`{s.glob}` ({s.license})" for s in included_sources(manifest)) or "none recorded"
    dedup = sum(manifest.stages.get(stage, {}).get("documents_dropped", 0) for stage in DEDUP_STAGES)
    pii = pii_replacements(manifest)
    lines = [
        f"- `{root}`: {splits}; tokenizer vocabulary {manifest.tokenizer.vocab_size:,}",
        f"- sources: {sources}",
        f"- preparation dropped {stage_counts(manifest, 'dropped'):,} documents ({dedup:,} as duplicates) and changed "
        f"{stage_counts(manifest, 'changed'):,}; PII replaced: "
        + (", ".join(f"{label} {n:,}" for label, n in pii.items()) or "none"),
        f"- removals executed (`keel data remove`): {len(manifest.removals)}",
    ]
    return lines


def _composition(root: Path, manifest: Manifest) -> list[str]:
    tok = manifest.tokenizer
    lines = ["## Composition", ""]
    rows = [[name, e.documents, e.tokens, len(e.shards)] for name, e in manifest.splits.items()]
    lines += table(["split", "documents", "tokens", "shards"], rows)
    lines += ["", f"Tokens are {manifest.dtype} ids of a {tok.vocab_size:,}-token tokenizer (`{tok.file}`, sha256 "]
    lines[-1] += f"{tok.sha256[:16]}...); every document ends with the end-of-text token (id {tok.eos_id})."
    lines += ["", "### Sources and licenses", "", *source_table(manifest)]
    for split in manifest.splits:
        starts, ends = document_bounds(root, manifest, split)
        profile = lengths(ends - starts)
        lines += ["", f"### Document length, {split} split (tokens, the end-of-text token included)", ""]
        if profile is None:
            lines.append("No documents.")
            continue
        q = profile.quantiles
        lines.append(f"Mean {profile.mean:,.1f}; " + ", ".join(f"{name} {v:,}" for name, v in q.items()) + ".")
        lines += ["", *table(["tokens", "documents", "share"], [_bin(b, profile.documents) for b in profile.histogram])]
        guess = languages(root, split, starts, ends)
        assert guess is not None  # a split with documents has a sample
        how = (
            f"a random sample of {guess.sampled:,} of {guess.documents:,}; shares within ±{100 * guess.margin:.1f} "
            "points, 95%"
            if guess.margin
            else "every document"
        )
        lines += ["", f"### Language, {split} split (py3langid's guess on {how})"]
        rows = [[code, n, f"{100 * n / guess.sampled:.1f}%"] for code, n in guess.counts.items()]
        lines += ["", *table(["language (ISO 639-1)", "documents sampled", "share"], rows)]
    return lines


def _bin(b: tuple[int, int, int], total: int) -> list[object]:
    low, high, n = b
    return [f"{low:,}-{high:,}", n, f"{100 * n / total:.1f}%"]


def _preprocessing(manifest: Manifest) -> list[str]:
    s = manifest.settings
    stages = s.stages
    on = {k: v for k, v in vars(stages).items() if v not in (0, 0.0, False, "none", None)}
    lines = ["## Preprocessing, cleaning, labeling", ""]
    lines.append("Stage settings: " + (", ".join(f"{k} = {v}" for k, v in on.items()) or "every stage off") + ".")
    lines.append(f"Validation split: {s.val_fraction} of documents, by a hash of each document's file and position.")
    rows = [
        [stage, *(stats.get(f"{what}_{how}", 0) for how in ("dropped", "changed") for what in ("documents", "bytes"))]
        for stage, stats in manifest.stages.items()
    ]
    header = ["stage", "documents dropped", "bytes dropped", "documents changed", "bytes changed"]
    lines += ["", *(table(header, rows) if rows else ["No stage dropped or changed a document."])]
    dedup = {
        stage: manifest.stages[stage].get("documents_dropped", 0) for stage in DEDUP_STAGES if stage in manifest.stages
    }
    lines += ["", "Duplicates dropped: " + (", ".join(f"{k} {v:,}" for k, v in dedup.items()) or "none") + "."]
    pii = pii_replacements(manifest)
    changed = manifest.stages.get("pii", {}).get("documents_changed", 0)
    lines += ["", f"### PII replaced by typed placeholders (documents changed: {changed:,})", ""]
    lines += table(["type", "replacements"], [[label, n] for label, n in pii.items()]) if pii else ["None."]
    return lines


def data_card(dataset_dir: Path) -> str:
    """The data card of a prepared dataset as Markdown."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    flags = license_flags(manifest)
    included = included_sources(manifest)
    excluded = [s for s in manifest.sources if s.glob.startswith("!")]
    lines = [
        f"# Data card: {root.name}",
        "",
        f"Written by `keel data card` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{root}` "
        f"({MANIFEST} sha256 {manifest_sha256(root)[:16]}..., {manifest.format}). Sections follow Datasheets for "
        "Datasets; every figure is drawn from the manifest and the dataset's files.",
        "",
        "## Motivation",
        "",
        "Prepared by `keel data prepare` as language-model pretraining data. Who made it, for what and with whose "
        "funding is not in the manifest.",
        "",
        *_composition(root, manifest),
        "",
        "## Collection process",
        "",
        f"{sum(s.files for s in included):,} files read from {len(included)} source globs; "
        f"{sum(s.bytes for s in included):,} bytes of kept documents.",
    ]
    lines += [f"- excluded by `{s.glob}`: {s.files:,} files" for s in excluded]
    lines += [f"- skipped as unreadable ({kind}): {n:,}" for kind, n in sorted(manifest.skipped.items())]
    if manifest.merged_from:
        lines.append(f"- merged from {len(manifest.merged_from)} parts: " + ", ".join(manifest.merged_from))
    lines += ["", *_preprocessing(manifest), "", "## Uses and distribution", ""]
    if flags:
        lines += [f"- **flag**: {flag}" for flag in flags]
    else:
        lines.append("No source's license forbids commercial use or redistribution.")
    lines += ["", "## Maintenance", ""]
    removals = [[r.time, len(r.documents), ", ".join(r.shards)] for r in manifest.removals]
    lines += table(["removal (UTC)", "documents", "shards rewritten"], removals) if removals else ["No removals."]
    return "\n".join(lines) + "\n"


def write_data_card(dataset_dir: Path, out: Path | None = None) -> Path:
    """Write the data card (to DATASET_DIR/data_card.md unless `out`); returns its path."""
    path = Path(out) if out is not None else Path(dataset_dir) / DATA_CARD
    text = data_card(dataset_dir)
    with filesystem_errors("write the data card", DataError, where=path):
        atomic_write_text(path, text)
    return path
