"""The [prepare] section of the config schema (how `keel data prepare` works), and every section's base class."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Where a phone number written without its country code is looked up, in order (phonenumbers' region codes).
PHONE_REGIONS = ("US", "CA", "GB", "DE", "FR", "ES", "IT", "NL", "IN", "BR", "JP", "CN", "AU")


class PrepareConfig(Section):
    """How `keel data prepare` turns raw sources into the dataset at data.dataset."""

    sources: list[str] = Field(
        default_factory=list,
        description="Globs of raw text (.txt, .jsonl[.gz|.zst], .parquet, any text file); '!GLOB' excludes.",
    )
    tokenizer: str | None = Field(None, description="A tokenizer.json to use; empty trains a byte-level BPE.")
    vocab_size: int = Field(8192, gt=256, description="Vocabulary size of the BPE tokenizer trained by prepare.")
    val_fraction: float = Field(0.01, gt=0, lt=1, description="Share of documents held out for validation.")
    text_field: str = Field("text", min_length=1, description="Field of each JSON Lines record that holds the text.")
    shard_tokens: int = Field(50_000_000, gt=0, description="Tokens per shard file written by prepare.")
    workers: int = Field(
        0, ge=0, description="Processes for prepare's stages and tokenization (a pool); 0 uses every core."
    )
    licenses: dict[str, str] = Field(
        default_factory=dict, description='License tag per source glob, e.g. {"web/*.jsonl" = "CC-BY-4.0"}.'
    )
    tombstones: list[str] = Field(
        default_factory=list,
        description="Datasets (or tombstones files) whose removed documents prepare drops again, by content hash.",
    )
    bad_input: Literal["error", "skip"] = Field(
        "error", description="On a malformed, truncated or unreadable record or file: stop, or skip it and count it."
    )
    normalize: Literal["none", "NFC", "NFKC"] = Field("none", description="Unicode normalization applied first.")
    min_words: int = Field(0, ge=0, description="Drop documents with fewer words; 0 turns the filter off.")
    max_words: int = Field(0, ge=0, description="Drop documents with more words; 0 turns the filter off.")
    min_mean_word_length: float = Field(0.0, ge=0, description="Drop documents whose mean word length is below this.")
    max_mean_word_length: float = Field(0.0, ge=0, description="Drop documents whose mean word length is above this.")
    max_symbol_ratio: float = Field(0.0, ge=0, le=1, description="Drop documents with a larger non-alphanumeric share.")
    max_digit_ratio: float = Field(0.0, ge=0, le=1, description="Drop documents with a larger digit share.")
    max_repeated_line_fraction: float = Field(
        0.0, ge=0, le=1, description="Drop documents with a larger share of lines that occur more than once."
    )
    max_top_ngram_fraction: float = Field(
        0.0, ge=0, le=1, description="Drop documents whose most frequent word trigram covers more of the text."
    )
    dedup_exact: bool = Field(False, description="Drop documents whose text exactly repeats an earlier one.")
    dedup_near_threshold: float = Field(
        0.0, ge=0, lt=1, description="Drop MinHash near-duplicates at this Jaccard similarity (e.g. 0.8); 0 is off."
    )
    pii: bool = Field(
        False,
        description="Replace e-mails, phones, IPs, cards, IBANs, US SSNs and secrets by typed placeholders (<EMAIL>).",
    )
    pii_regions: list[str] = Field(
        default_factory=lambda: list(PHONE_REGIONS),
        min_length=1,
        description="Regions (e.g. GB) whose numbering plans validate phone numbers written without a +country code.",
    )
    pii_ner: bool = Field(
        False, description="Also replace person names and street addresses, found by a spaCy NER model (optional)."
    )
    pii_ner_model: str = Field(
        "en_core_web_sm",
        min_length=1,
        description="prepare.pii_ner's spaCy pipeline: an installed package or a directory.",
    )

    @field_validator("pii_regions")
    @classmethod
    def _known_regions(cls, regions: list[str]) -> list[str]:
        import phonenumbers  # here, not at the top: only a config that sets the key pays for the import

        unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown phone region {unknown[0]!r}; use two-letter region codes such as 'US', 'GB'")
        return regions

    @model_validator(mode="after")
    def _ner_scrubs(self) -> PrepareConfig:
        if self.pii_ner and not self.pii:
            raise ValueError("pii_ner: scrubs names only with prepare.pii = true; set both")
        return self
