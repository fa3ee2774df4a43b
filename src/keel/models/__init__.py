"""The model registry: a model is one file with a ModelSpec, plus one entry in MODELS."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from keel.config import validation_message
from keel.errors import ConfigError
from keel.models import llama
from keel.models.spec import ModelSpec

# Adding a model: one file in this package defining its SPEC, and one entry here.
MODELS: dict[str, ModelSpec] = {"llama": llama.SPEC}


def get_model_spec(name: str) -> ModelSpec:
    """The registered spec called `name`."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_args(section: dict[str, Any]) -> tuple[ModelSpec, BaseModel]:
    """Validate a raw [model] table (name plus arguments) into the spec and its typed arguments."""
    values = dict(section)
    spec = get_model_spec(values.pop("name", "llama"))
    try:
        return spec, spec.args_cls.model_validate(values)
    except ValidationError as e:
        raise ConfigError(validation_message(e, spec.args_cls, "model")) from None
