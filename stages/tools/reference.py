"""`medpipe params --markdown`: the params reference page (docs/params.md), generated from
the schema so it cannot drift (tests/test_params.py checks the page is current)."""

from __future__ import annotations

import json
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from stages.lib.params import Params, describe_params


def _valid_values(field: Any) -> str:
    """A field's valid values in words: the choices of a Literal, the bounds of a number."""
    choices = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    literals = [v for c in choices for v in typing.get_args(c)] if choices else []
    if typing.get_origin(field.annotation) is Literal:
        literals = list(typing.get_args(field.annotation))
    if literals and all(not isinstance(v, type) for v in literals):
        text = ", ".join(f"`{v}`" for v in literals)
        return text + (", or null" if type(None) in typing.get_args(field.annotation) else "")
    bounds = []
    for item in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, name, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
    return " and ".join(bounds)


def params_reference(model: type[BaseModel] = Params) -> str:
    """docs/params.md: every key of the schema by section, with its default, valid values and
    meaning (`medpipe params --markdown`; a test keeps the page current)."""
    lines = [
        "# Parameters reference",
        "",
        "Every key of `params.yaml`, generated from the schema (`stages/lib/params.py`) by",
        "`medpipe params --markdown > docs/params.md`; `tests/test_params.py` checks that it",
        "is current. Defaults as `params.yaml` writes them (null: unset).",
    ]
    for section, field in model.model_fields.items():
        lines += ["", f"## {section}", ""]
        doc = (field.annotation.__doc__ or "").strip()
        if doc:
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | default | valid | meaning |", "| --- | --- | --- | --- |"]
        for key, _, meaning in describe_params(field.annotation, f"{section}."):
            leaf = _leaf_field(model, key)
            default = json.dumps(to_jsonable_python(leaf.get_default(call_default_factory=True)))
            cells = [f"`{key}`", f"`{default}`", _valid_values(leaf), meaning]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _leaf_field(model: type[BaseModel], key: str) -> Any:
    field = None
    for part in key.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else model
    return field
