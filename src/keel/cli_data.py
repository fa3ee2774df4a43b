"""The `keel data` commands (prepare, merge, inspect, card, verify, lineage, remove), and the --set option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from keel.errors import KeelError

data_app = typer.Typer(help="Prepare and inspect datasets.", no_args_is_help=True, rich_markup_mode=None)

SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set optim.lr=3e-4 (repeatable).")
]


@data_app.command("prepare")
def data_prepare(
    config: Annotated[
        Path | None, typer.Argument(help="TOML config: [prepare] says how, data.dataset where to write.")
    ] = None,
    overrides: SetOption = None,
    source: Annotated[list[str] | None, typer.Option(help="Glob of raw text files (sets prepare.sources).")] = None,
    out: Annotated[Path | None, typer.Option(help="Dataset directory to write (sets data.dataset).")] = None,
    shard: Annotated[
        str | None, typer.Option(help="Prepare only part i of N of the input files, as 'i/N'; join with merge.")
    ] = None,
) -> None:
    """Tokenize raw text (.txt, .jsonl[.gz|.zst], .parquet) into token shards with a manifest and a validation split."""
    from keel.config_toml import load_config
    from keel.data.prepare import prepare_from_config
    from keel.models import model_args
    from keel.observe.logs import setup_logging

    extra = list(overrides or [])
    if source:
        extra.append(f"prepare.sources={json.dumps(source)}")
    if out is not None:
        extra.append(f"data.dataset={json.dumps(str(out))}")
    cfg = load_config(config, extra)
    model_args(cfg.model_section())  # [model] is as strict here as where it is used: an unknown key is refused
    if not cfg.prepare.sources:
        raise KeelError("no sources to prepare: set prepare.sources in the config or pass --source GLOB")
    part = _parse_part(shard)
    log = setup_logging(None, 0)
    prepare_from_config(cfg, log.info, part)


def _parse_part(shard: str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    i, _, n = shard.partition("/")
    if not (i.isdigit() and n.isdigit()):
        raise KeelError(f"--shard {shard!r}: expected 'i/N', e.g. --shard 0/4")
    return int(i), int(n)


@data_app.command("merge")
def data_merge(
    out: Annotated[Path, typer.Argument(help="Dataset directory to create.")],
    parts: Annotated[list[Path], typer.Argument(help="Datasets prepared with --shard i/N.")],
) -> None:
    """Join datasets prepared as `--shard i/N` parts (same tokenizer) into one dataset."""
    from keel.data.merge import merge_datasets

    m = merge_datasets(parts, out)
    sizes = ", ".join(f"{split} {entry.tokens:,} tokens" for split, entry in m.splits.items())
    print(f"merged {len(parts)} parts into {out}: {sizes}")


@data_app.command("inspect")
def data_inspect(
    dataset: Annotated[Path, typer.Argument(help="Prepared dataset directory.")],
) -> None:
    """Summarize a prepared dataset: splits, sources and licenses, stage statistics, skipped records."""
    from keel.data.inspect import inspect_lines

    print("\n".join(inspect_lines(dataset)))


@data_app.command("card")
def data_card(
    dataset: Annotated[Path, typer.Argument(help="Prepared dataset directory.")],
    out: Annotated[Path | None, typer.Option(help="Where to write it (default: DATASET/data_card.md).")] = None,
) -> None:
    """Write the dataset's data card: sources and licenses, stages, PII, dedup, removals, lengths, languages."""
    from keel.data.card import write_data_card

    print(f"wrote {write_data_card(dataset, out)}")


@data_app.command("verify")
def data_verify(
    dataset: Annotated[Path, typer.Argument(help="Prepared dataset directory.")],
) -> None:
    """Re-hash the tokenizer and every shard against the manifest; exit 2 if any differs."""
    from keel.data.inspect import verify_dataset

    lines, ok = verify_dataset(dataset)
    print("\n".join(lines))
    if not ok:
        raise typer.Exit(2)


SourceOption = Annotated[str, typer.Option(help="Source file (its path, or its key as `keel data inspect` lists).")]
OrdinalOption = Annotated[
    int | None, typer.Option(help="Only this document of the file (JSON Lines line number / Parquet row).")
]


@data_app.command("lineage")
def data_lineage(
    dataset: Annotated[Path, typer.Argument(help="Prepared dataset directory.")],
    source: SourceOption,
    ordinal: OrdinalOption = None,
    seq_len: Annotated[int, typer.Option(help="train.seq_len, to list the sample ids.", min=1)] = 256,
    run: Annotated[
        list[Path] | None, typer.Option(help="A run dir: which of its steps and checkpoints saw it (repeatable).")
    ] = None,
) -> None:
    """List the shards and sample ids that hold a source file's documents, and which runs' steps read them."""
    from keel.data.lineage import find_documents, sample_ids, shards_of
    from keel.data.manifest import load_manifest
    from keel.data.versions import document_versions
    from keel.train.lineage import lineage_lines, run_lineage

    # With runs, a removed document is still answered for from the versions before its removal.
    versions = document_versions(dataset, source, ordinal) if run else []
    runs = [run_lineage(dataset, versions, r) for r in run or []]  # every run is checked before anything is printed
    manifest = load_manifest(dataset)
    spans = versions[0].spans if run else find_documents(dataset, source, ordinal)
    for d in spans:
        ids = sample_ids(d, seq_len)
        print(
            f"{d.split} document {d.ordinal}: tokens [{d.start}, {d.end}), shards {', '.join(shards_of(manifest, d))}, "
            f"sample ids {ids.start}..{ids.stop - 1} at seq_len {seq_len}"
        )
    if run and not spans:
        print(f"{source}: removed from {dataset}; the runs are answered from the versions before the removal")
    for r in runs:
        print("\n".join(lineage_lines(r)))


@data_app.command("remove")
def data_remove(
    dataset: Annotated[Path, typer.Argument(help="Prepared dataset directory.")],
    source: SourceOption,
    ordinal: OrdinalOption = None,
    retrain_tokenizer: Annotated[
        bool, typer.Option(help="Train the tokenizer again on the kept text and re-encode every shard.")
    ] = False,
    tombstones: Annotated[
        Path | None, typer.Option(help="Also add the tombstones to this file (for prepare.tombstones).")
    ] = None,
) -> None:
    """Remove a source file's documents (or one): shards, manifest, tombstones for later prepares, vocabulary."""
    from keel.data.erase import erase_documents, erased_lines
    from keel.data.lineage import find_documents
    from keel.data.manifest import load_manifest
    from keel.data.tombstones import add_to_file, check_tombstones_file

    spans = find_documents(dataset, source, ordinal)
    if tombstones is not None:
        check_tombstones_file(tombstones)  # before the removal: it cannot fail half done
    erased = erase_documents(dataset, spans, whole_files=ordinal is None, retrain=retrain_tokenizer)
    print("\n".join(erased_lines(erased, dataset, ordinal is None)))
    if tombstones is not None:
        held = add_to_file(tombstones, load_manifest(dataset).tombstones or [])
        print(f"tombstones: {tombstones} holds {held}")
