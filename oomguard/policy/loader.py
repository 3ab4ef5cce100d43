"""Loading policy files: the policy layer's only I/O.

YAML is read with a SafeLoader that (a) reads ``2e-4`` as a float (YAML 1.1 would
read it as text) and (b) reports duplicate keys instead of keeping the last one.
"""

from __future__ import annotations

import os
import re
import stat
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from oomguard.errors import PolicyError
from oomguard.policy.checks import Sections, check_sections
from oomguard.policy.problems import Problem, format_lines, pydantic_problems, yaml_problem
from oomguard.policy.schema import Capabilities, FlagNames, Knobs, Ladders, Limits, Match, Policy

__all__ = ["JSON_SCHEMA_DIALECT", "MAX_POLICY_BYTES", "load_all_shipped", "load_policy", "load_policy_arg",
           "parse_policy", "policy_json_schema", "shipped_policy_paths"]

_FLOAT = re.compile(r"""^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$""")
_SECTIONS: dict[str, Any] = {"knobs": Knobs, "ladders": Ladders, "capabilities": Capabilities,
                             "match": Match, "limits": Limits,
                             "flags": TypeAdapter(dict[str, FlagNames])}


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps a list of duplicate keys (with their lines)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates: list[Problem] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                self.duplicates.append((f"line {key_node.start_mark.line + 1}",
                                        f"duplicate key {key!r}; keep one (the later one would win silently)"))
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_policy(data: Any, source: str = "<memory>") -> Policy:
    """Validate a parsed policy mapping; raise PolicyError with every problem at once."""
    if not isinstance(data, dict):
        raise PolicyError([f"{source}: (top level): a policy is a mapping of keys "
                           f"(got {type(data).__name__}, expected name:, knobs:, ladders:, ...)"])
    problems: list[Problem] = []
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        problems += pydantic_problems(e, Policy)
    problems += check_sections(_sections(policy, data))
    if problems:
        raise PolicyError(format_lines(source, problems))
    assert policy is not None
    policy._source = source
    return policy


def _sections(policy: Policy | None, data: dict[str, Any]) -> Sections:
    """The validated sections; when the whole file failed, each section on its own."""
    if policy is not None:
        return Sections(policy.knobs, policy.ladders, policy.capabilities, policy.match,
                        policy.limits, policy.flags)
    good: dict[str, Any] = {}
    for key, model in _SECTIONS.items():
        if key not in data or data[key] is None:
            continue
        try:
            validate = model.model_validate if isinstance(model, type) and issubclass(model, BaseModel) \
                else model.validate_python
            good[key] = validate(data[key])
        except ValidationError:
            continue  # already reported by the whole-file pass
    return Sections(**good)


def load_policy(path: str | Path) -> Policy:
    """Read and validate one policy file."""
    source = str(path)
    text = _read_policy_text(Path(path), source)
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise PolicyError([f"{source}: {yaml_problem(e)}"]) from e
    finally:
        loader.dispose()
    problems = format_lines(source, loader.duplicates)
    try:
        policy = parse_policy(data, source)
    except PolicyError as e:
        raise PolicyError(problems + e.problems) from None
    if problems:
        raise PolicyError(problems)
    return policy


MAX_POLICY_BYTES = 1 << 20  # a policy is a page of YAML; anything bigger is the wrong file


def _read_policy_text(path: Path, source: str) -> str:
    """The file's text; PolicyError for a non-regular file (``/dev/zero``, a FIFO: reading would
    never end), an oversized one, or bytes that are not UTF-8."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device or special file"
            raise PolicyError([f"{source}: (file): is a {kind}, not a regular file "
                               "(give a shipped name or a .yaml file)"])
        with open(path, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise PolicyError([f"{source}: (file): cannot read it: {e.strerror} "
                           f"(give a shipped name or an existing .yaml file)"]) from e
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError([f"{source}: (file): larger than {MAX_POLICY_BYTES} bytes, not a policy "
                           "(give a shipped name or a policy .yaml file)"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError([f"{source}: (file): not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                           "save the file as UTF-8"]) from None


def shipped_policy_paths() -> dict[str, Path]:
    """Shipped policy name -> file (the name is the file stem)."""
    folder = Path(str(resources.files("oomguard") / "policies"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_policy_arg(name_or_path: str) -> Policy:
    """A shipped name (``h100-80gb``) or a path to a policy file."""
    shipped = shipped_policy_paths()
    if not name_or_path.strip():
        raise PolicyError([f"{name_or_path!r}: (name): empty policy name (expected one of: "
                           f"{', '.join(shipped)} or a .yaml path)"])
    if name_or_path in shipped:
        return load_policy(shipped[name_or_path])
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_policy(path)
    raise PolicyError([f"{name_or_path}: (name): no shipped policy of that name and no such file "
                       f"(got {name_or_path!r}, expected one of: {', '.join(shipped)} or a .yaml path)"])


def load_all_shipped() -> list[Policy]:
    return [load_policy(p) for p in shipped_policy_paths().values()]


JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# pydantic writes a bound of a union-typed field (``Number``: int | float) under its own Field name
_BOUND_KEYWORDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
_NON_STANDARD = ("discriminator",)  # OpenAPI's; the ``oneOf`` of ``const`` ops already decides


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a policy file: editors complete policy files from it, and a standard
    validator rejects what ``oomguard policy validate`` rejects for a bound or a type. Only standard
    keywords: pydantic's leaked ``ge``/``gt``/``le``/``lt`` become ``minimum``/``exclusiveMinimum``/
    ``maximum``/``exclusiveMaximum``."""
    schema = _standard_keywords(Policy.model_json_schema())
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def _standard_keywords(node: Any) -> Any:
    if isinstance(node, list):
        return [_standard_keywords(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "$defs", "patternProperties", "dependentSchemas"):  # maps of names to schemas
            out[key] = {name: _standard_keywords(sub) for name, sub in value.items()}
        elif key in ("default", "const", "enum", "examples"):  # values, not schemas
            out[key] = value
        elif key in _NON_STANDARD:
            continue
        else:
            out[_BOUND_KEYWORDS.get(key, key)] = _standard_keywords(value)
    return out
