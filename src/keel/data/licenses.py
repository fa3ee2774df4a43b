"""License tags and what they allow (commercial use, redistribution), for the data card and the model card.

The table is a reading of each license's own terms for one question: may a dataset prepared from a source
under it (filtered, deduplicated, tokenized: an adaptation) be used commercially and shared? It is no legal
advice; a tag it does not know is `unknown`, and an unknown source is flagged like a restricted one.
docs/cards.md has the same table for people.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Terms:
    """What a license allows: None where the tag does not say (an unknown or custom license)."""

    kind: str
    commercial: bool | None
    redistribution: bool | None


VERSION = r"(-\d(\.\d)?)?"
# First match wins, so the narrower Creative Commons variants come before plain CC-BY.
RULES: list[tuple[str, Terms]] = [
    (rf"cc0{VERSION}|pddl|public-domain|unlicense|wtfpl", Terms("public domain", True, True)),
    (rf"cc-by-nc-nd{VERSION}", Terms("non-commercial, no derivatives", False, False)),
    (rf"cc-by-nc(-sa)?{VERSION}", Terms("non-commercial", False, True)),
    (rf"cc-by-nd{VERSION}", Terms("no derivatives (a prepared copy is an adaptation)", True, False)),
    (rf"cc-by-sa{VERSION}|odbl{VERSION}|cdla-sharing{VERSION}", Terms("share-alike", True, True)),
    (
        rf"(a|l)?gpl{VERSION}(-only|-or-later|\+)?|gfdl{VERSION}|mpl-2\.0|epl{VERSION}|eupl{VERSION}",
        Terms("copyleft", True, True),
    ),
    (rf"cc-by{VERSION}|odc-by{VERSION}|cdla-permissive{VERSION}", Terms("attribution", True, True)),
    (
        r"mit|apache-2\.0|bsd(-[23]-clause(-clear)?)?|isc|zlib|bsl-1\.0|postgresql|ncsa|artistic-2\.0|afl-3\.0|"
        r"ecl-2\.0|ms-pl|etalab-2\.0|ofl-1\.1|psf-2\.0|python-2\.0",
        Terms("permissive", True, True),
    ),
    (r"proprietary|all-rights-reserved|copyrighted", Terms("proprietary", False, False)),
]
UNKNOWN = Terms("unknown", None, None)

# The license identifiers the Hugging Face Hub accepts in a card's `license:`; any other tag is `other` there.
HF_LICENSES = set(
    "apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m "
    "afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 "
    "cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 "
    "cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 "
    "cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl "
    "gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql "
    "ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 gemma unknown other".split()
)


def normalize(tag: str) -> str:
    """A tag as the table and the Hub spell it: lower case, spaces and underscores as dashes."""
    return re.sub(r"[\s_]+", "-", tag.strip().lower())


def terms(tag: str) -> Terms:
    """What the license `tag` allows (UNKNOWN for a tag the table does not know)."""
    tag = normalize(tag)
    return next((t for pattern, t in RULES if re.fullmatch(pattern, tag)), UNKNOWN)


def restriction(tag: str) -> str | None:
    """Why a source under `tag` is flagged (no commercial use, no redistribution, unknown terms), or None."""
    t = terms(tag)
    if t is UNKNOWN:
        return f"license {tag!r} is unknown: check its terms before commercial use or redistribution"
    refused = [what for what, ok in (("commercial use", t.commercial), ("redistribution", t.redistribution)) if not ok]
    return f"license {tag} ({t.kind}) forbids {' and '.join(refused)}" if refused else None


def hf_license(tag: str) -> dict[str, str]:
    """The card metadata naming `tag`: `license` if the Hub knows it, else `license: other` with a license_name."""
    tag = normalize(tag)
    if tag in HF_LICENSES:
        return {"license": tag}
    return {"license": "other", "license_name": re.sub(r"[^a-z0-9.-]+", "-", tag).strip("-") or "custom"}
