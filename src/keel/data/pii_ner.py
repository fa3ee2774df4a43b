"""Optional NER scrubbing (prepare.pii_ner): person names and street addresses, found with a spaCy model.

The pipeline is prepare.pii_ner_model: an installed spaCy package (en_core_web_sm by default) or a pipeline
directory (`nlp.to_disk`). spaCy's models are not installed with Keel; turning the option on without the one named
is a one-line error. A person is a PERSON entity; an address is a house number and street (a FAC entity, or a name
ending in a street word), extended over the city (GPE), state and postal code that follow it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from keel.errors import ConfigError

MODEL = "en_core_web_sm"
INSTALL = "pip install spacy==3.8.18 and a model (python -m spacy download {model}), or name a pipeline directory"
_STREET = re.compile(
    r"\b\d{1,5}[A-Za-z]?(?:[ ][A-Z][A-Za-z.'-]*){1,4}[ ](?:Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Boulevard|Blvd\.?|"
    r"Lane|Ln\.?|Drive|Dr\.?|Court|Ct\.?|Way|Place|Pl\.?|Terrace|Square|Sq\.?|Parkway|Pkwy\.?|Highway|Hwy\.?)"
)
# After a street: ", City", ", ST 12345" or ", Postcode": what an address line goes on with.
_TAIL = re.compile(r"(?:,? (?:[A-Z][A-Za-z.'-]*(?: [A-Z][A-Za-z.'-]*){0,2}|[A-Z]{2} \d{5}(?:-\d{4})?|\d{5}))+")


@lru_cache(maxsize=2)
def _nlp(model: str):
    """The spaCy pipeline `model`, loaded once per process, with only what NER needs."""
    how = INSTALL.format(model=model if "/" not in model else MODEL)
    try:
        import spacy
    except ImportError:
        raise ConfigError(f"prepare.pii_ner needs spaCy: {how}") from None
    try:
        nlp = spacy.load(model, exclude=["parser", "lemmatizer", "attribute_ruler", "tagger", "senter"])
    except (OSError, ValueError) as e:  # not installed, not a pipeline directory, or a broken one
        raise ConfigError(f"prepare.pii_ner_model: cannot load the spaCy pipeline {model} ({e}); {how}") from None
    if "ner" not in nlp.pipe_names and "entity_ruler" not in nlp.pipe_names:
        raise ConfigError(f"prepare.pii_ner_model: the spaCy pipeline {model} finds no entities (no ner component)")
    return nlp


def require_ner(model: str = MODEL) -> None:
    """Raise a one-line ConfigError unless spaCy and the pipeline `model` load."""
    _nlp(model)


def find_entities(text: str, model: str = MODEL) -> list[tuple[int, int, str]]:
    """(start, end, label) of each person name (PERSON) and street address (ADDRESS), in order, not overlapping."""
    doc = _nlp(model)(text)
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
