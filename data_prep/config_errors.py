"""One line per wrong field of a JSON config: what pydantic found, in the words of the file.

The data-prep config (`data_prep/config.py`) and the training profile (`pipeline/config.py`)
are validated by pydantic models, and both report a `ValidationError` the same way, every
wrong field at once, each on its own line:

    prep.json: sources.0.max_bytes: expected a valid integer, got "lots"
    prep.json: shards.tgt: unknown key (check its spelling and section)
    7b.json: train.steps: expected a valid integer or 'auto', got "abc"

The field is the dotted path a user would write (`sources.0.max_bytes`), without the tags
pydantic adds for the members of a union (`int`, `literal['auto']`, `function-after[...]`),
and the members' expectations of one field are joined into one ("a valid integer or 'auto'").
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """The config sections a field's annotation holds at its own level (`X`, `X | None`, a union of
    sections), not those inside a list or a mapping (`list[X]`): they are one key further."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (list, tuple, set, frozenset, dict):
        return []
    return [m for a in typing.get_args(annotation) for m in _models_of(a)]


def _item_of(annotation: Any) -> tuple[bool, Any]:
    """(whether the field is a list or a mapping, the annotation of its items)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset):
        return True, args[0] if args else Any
    if origin is dict:
        return True, args[1] if len(args) == 2 else Any
    for a in args:  # `list[X] | None`, Annotated[...]
        found, item = _item_of(a)
        if found:
            return True, item
    return False, None


def _walk(root: type[BaseModel], loc: tuple) -> tuple[str, Any]:
    """(the dotted field name of an error location under `root`, pydantic's union tags left out;
    the annotation of what it names)."""
    parts, annotation = [], root
    for part in loc:
        is_container, item = _item_of(annotation)
        if is_container and not _models_of(annotation):  # a list index or a mapping key
            parts.append(str(part))
            annotation = item
            continue
        owner = next((m for m in _models_of(annotation) if isinstance(part, str) and part in m.model_fields), None)
        if owner is not None:
            parts.append(part)
            annotation = owner.model_fields[part].annotation
    return ".".join(parts), annotation


def _names_a_field(root: type[BaseModel], loc: tuple, msg: str) -> bool:
    """Whether a section-wide check's message starts with one of the section's fields
    ("mixture.web: weight must be > 0"), which then continues the path."""
    first = re.match(r"[A-Za-z_]\w*", msg)
    return first is not None and any(first.group() in m.model_fields for m in _models_of(_walk(root, loc)[1]))


def _error_field(root: type[BaseModel], e: dict) -> str:
    if e["type"] == "extra_forbidden":  # the unknown key itself is no field of its section
        return ".".join(filter(None, [_walk(root, e["loc"][:-1])[0], str(e["loc"][-1])]))
    return _walk(root, e["loc"])[0] or "<top>"


def error_lines(source: str, root: type[BaseModel], err: ValidationError) -> list[str]:
    """`SOURCE: field: what is wrong` for every field `err` names, in the file's order."""
    lines, expected = [], {}
    for e in err.errors():
        loc = _error_field(root, e)
        msg = e["msg"].removeprefix("Value error, ")
        got = json.dumps(e.get("input"), default=str)[:80]
        if e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A check across a section's fields: its message may start with the field it blames.
            joined = msg if loc == "<top>" else f"{loc}{'.' if _names_a_field(root, e['loc'], msg) else ': '}{msg}"
            lines.append(f"{source}: {joined}")
        elif e["type"] in ("missing", "extra_forbidden"):
            msg = "unknown key (check its spelling and section)" if e["type"] == "extra_forbidden" else msg
            lines.append(f"{source}: {loc}: {msg}")
        elif msg.startswith("Input should be "):
            if (loc, got) not in expected:
                lines.append((loc, got))
            expected.setdefault((loc, got), []).append(re.sub(r", (unable|got) .*", "", msg[len("Input should be "):]))
        else:
            lines.append(f"{source}: {loc}: {msg} (got {got})")
    return [line if isinstance(line, str) else
            f"{source}: {line[0]}: expected {' or '.join(dict.fromkeys(expected[line]))}, got {line[1]}"
            for line in lines]
