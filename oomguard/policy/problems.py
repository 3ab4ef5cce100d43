"""Turn pydantic and YAML errors into one-line problems: ``key.path: problem (got X, expected Y)``.

Pydantic locations name union members and discriminator tags (``rungs.1.scale.factor``);
walking the model types alongside the location drops those, so the path is the
one a user sees in the file, and an unknown key can list the allowed ones.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

__all__ = ["Problem", "REMOVED_FLAG_KEYS", "format_lines", "pydantic_problems", "yaml_problem"]

Problem = tuple[str, str]

_TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
               "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
               "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
               "int_parsing": "an integer", "float_parsing": "a number", "none_required": "null"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


def pydantic_problems(error: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """One problem per offending key; errors of several union members are merged."""
    merged: dict[str, tuple[str, str, list[str]]] = {}
    for err in error.errors():
        path, parent = _walk(root, err["loc"])
        what, expected = _describe(err, parent)
        got = _show(err.get("input"))
        if path in merged:
            merged[path][2].append(expected)
        else:
            merged[path] = (what, got, [expected])
    out = []
    for path, (what, got, expected) in merged.items():
        exp = " or ".join(dict.fromkeys(e for e in expected if e))
        detail = ", ".join(x for x in (f"got {got}" if got else "", f"expected {exp}" if exp else "") if x)
        out.append((path or "(top level)", f"{what} ({detail})" if detail else what))
    return out


# Keys of a policy's ``flags.<knob>`` entry before issue 12 (named with the fix when found).
REMOVED_FLAG_KEYS = ("append", "style", "values")


def _describe(err: dict[str, Any], parent: type[BaseModel] | None) -> tuple[str, str]:
    kind, ctx = err["type"], err.get("ctx") or {}
    key = str(err["loc"][-1]) if err["loc"] else ""
    if kind == "extra_forbidden" and key in REMOVED_FLAG_KEYS:
        return (f"{key!r} was removed: oomguard never appends or rewrites flags into a new style (Trust "
                "rule 1); it edits flags the command already has and sets the rest in the child. Delete "
                f"{key!r} (keep only names: extra spellings)"), ""
    if kind == "extra_forbidden":
        allowed = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})", ""
    if kind == "missing":
        return f"missing required key {key!r}; add it", ""
    if kind == "union_tag_invalid":
        return f"unknown op {ctx.get('tag')!r}", f"one of {_plain_tags(ctx.get('expected_tags'))}"
    if kind == "union_tag_not_found":
        return "a rung needs an 'op' key", "op: scale, set, step_down, halve_batch or quantile_step"
    if kind in _BOUNDS:
        sign, name = _BOUNDS[kind]
        return "out of range", f"{sign} {ctx.get(name)}"
    if kind in ("literal_error", "enum"):
        return "not an allowed value", f"one of {ctx.get('expected')}"
    if kind in _TYPE_WORDS:
        return "wrong type", _TYPE_WORDS[kind]
    return err["msg"], ""


def _plain_tags(expected: Any) -> str:
    """Pydantic's ``<RungOp.SCALE: 'scale'>, <RungOp.SET: 'set'>`` as ``'scale', 'set'`` (what a file holds)."""
    text = re.sub(r"<\w+(?:\.\w+)+: ('[^']*')>", r"\1", str(expected))
    head, sep, last = text.rpartition(", ")
    return f"{head} or {last}" if sep and " or " not in text else text


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None]:
    """The dotted user-facing path of ``loc`` and the model that holds its last key."""
    parts: list[str] = []
    current: Any = root
    parent: type[BaseModel] | None = root
    for el in loc:
        current = _unwrap(current)
        if isinstance(current, list):  # a union: ``el`` names the member (tag or type)
            current = _member(current, el)
            continue
        if el == "[key]":
            continue
        parts.append(str(el))
        parent = current if _is_model(current) else None
        current = _child(current, el)
    return ".".join(parts), parent


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional; a real union becomes the list of its members."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
        return members[0] if len(members) == 1 else members
    return tp


def _member(members: list[Any], el: Any) -> Any:
    for m in members:
        if _is_model(m) and "op" in m.model_fields:
            tag = typing.get_args(m.model_fields["op"].annotation)
            if tag and getattr(tag[0], "value", tag[0]) == el:
                return m
    return None


def _child(tp: Any, el: Any) -> Any:
    if _is_model(tp):
        field = tp.model_fields.get(el)
        if field is not None:
            return field.annotation
        # a declared extra (e.g. a knob): its value is a union of scalar types
        return ["extra"] if tp.model_config.get("extra") == "allow" else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping" if value else "{}"
    if isinstance(value, list):
        return f"a list of {len(value)}" if value else "[]"
    if isinstance(value, str):
        return f"str {value!r}"
    return "" if value is None else f"{type(value).__name__} {value!r}"


def yaml_problem(error: Exception) -> str:
    """``line L, column C: malformed YAML: ...`` from a PyYAML error (1-based)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(x) for x in (getattr(error, "context", None), getattr(error, "problem", None)) if x)
    return f"{where}malformed YAML: {what or error} (fix the syntax there; check indentation and quotes)"


def format_lines(source: str, problems: Iterable[Problem]) -> list[str]:
    return [f"{source}: {path}: {text}" for path, text in problems]
