"""Optional NER scrubbing (prepare.pii_ner): person names and street addresses, found with a spaCy model.

spaCy and its English model are not installed with Keel; turning the option on without them is a one-line
error. A person is a PERSON entity; an address is a house number and street (a FAC entity, or a name ending in
a street word), extended over the city (GPE), state and postal code that follow it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from keel.errors import ConfigError

MODEL = "en_core_web_sm"
INSTALL = f"pip install spacy==3.8.18 and its {MODEL} model (python -m spacy download {MODEL})"
_STREET = re.compile(
    r"\b\d{1,5}[A-Za-z]?(?:[ ][A-Z][A-Za-z.'-]*){1,4}[ ](?:Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Boulevard|Blvd\.?|"
    r"Lane|Ln\.?|Drive|Dr\.?|Court|Ct\.?|Way|Place|Pl\.?|Terrace|Square|Sq\.?|Parkway|Pkwy\.?|Highway|Hwy\.?)"
)
# After a street: ", City", ", ST 12345" or ", Postcode": what an address line goes on with.
_TAIL = re.compile(r"(?:,? (?:[A-Z][A-Za-z.'-]*(?: [A-Z][A-Za-z.'-]*){0,2}|[A-Z]{2} \d{5}(?:-\d{4})?|\d{5}))+")


@lru_cache(maxsize=1)
def _nlp():
    """The spaCy pipeline, loaded once per process, with only what NER needs."""
    try:
        import spacy
    except ImportError:
        raise ConfigError(f"prepare.pii_ner needs spaCy: {INSTALL}") from None
    try:
        return spacy.load(MODEL, exclude=["parser", "lemmatizer", "attribute_ruler", "tagger", "senter"])
    except OSError:
        raise ConfigError(f"prepare.pii_ner needs the spaCy model {MODEL}: {INSTALL}") from None


def require_ner() -> None:
    """Raise a one-line ConfigError unless spaCy and its model load."""
    _nlp()


def find_entities(text: str) -> list[tuple[int, int, str]]:
    """(start, end, label) of each person name (PERSON) and street address (ADDRESS), in order, not overlapping."""
    doc = _nlp()(text)
    found = [(e.start_char, e.end_char, "PERSON") for e in doc.ents if e.label_ == "PERSON"]
    streets = [(m.start(), m.end()) for m in _STREET.finditer(text)]
    streets += [(e.start_char, e.end_char) for e in doc.ents if e.label_ == "FAC" and any(c.isdigit() for c in e.text)]
    for start, end in streets:
        tail = _TAIL.match(text, end)
        found.append((start, tail.end() if tail else end, "ADDRESS"))
    found.sort(key=lambda f: (f[0], -f[1]))
    out: list[tuple[int, int, str]] = []
    for start, end, label in found:
        if out and start < out[-1][1]:
            if label == "ADDRESS" and end > out[-1][1]:
                out[-1] = (out[-1][0], end, "ADDRESS")  # a name inside an address ("12 Abbey Road") is the address
            continue
        out.append((start, end, label))
    return out
