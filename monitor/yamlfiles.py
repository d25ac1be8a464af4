"""The YAML files rule authors write (rules, parameters, tables, kri.yaml, rule tests): read safely with the line
of every key and item, and validation problems reported as rule authors read them (file, line, what is wrong,
"did you mean ...")."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from monitor.errors import RuleFileError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""Safe loader only (a `!!python/object` tag is refused, never constructed); libyaml's when PyYAML has it (about
10x faster: a hot reload parses every file)."""


def load_yaml(path: Path, text: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse YAML and remember the line of every mapping key and sequence item (1-based)."""
    lines: dict[tuple[Any, ...], int] = {}
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RuleFileError([(str(path), mark.line + 1 if mark else None, f"not valid YAML: {exc}")]) from None

    def walk(n: yaml.Node | None, at: tuple[Any, ...]) -> None:
        if n is None:
            return
        lines.setdefault(at, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in n.value:
                key = key_node.value
                if key in seen:
                    duplicates.append((str(path), key_node.start_mark.line + 1, f"duplicate key '{key}'"))
                seen.add(key)
                lines[at + (key,)] = key_node.start_mark.line + 1
                walk(value_node, at + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[at + (i,)] = item.start_mark.line + 1
                walk(item, at + (i,))

    duplicates: list[tuple[str, int | None, str]] = []
    walk(node, ())
    if duplicates:
        raise RuleFileError(duplicates)
    try:
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RuleFileError([(str(path), mark.line + 1 if mark else None, f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    return data, lines


def line_for(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    """The line of `loc`, or of its nearest enclosing key that has one."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _field_names(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The valid field names at a location of a model (for "did you mean ...")."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
            for inner in getattr(candidate, "__args__", ()):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    current = inner
                    break
    return list(getattr(current, "model_fields", {}))


def pydantic_problems(path: Path, exc: ValidationError, lines: dict[tuple[Any, ...], int],
                       model: type[BaseModel] | None = None) -> list[tuple[str, int | None, str]]:
    """pydantic errors as rule authors read them: the YAML path, the line, what is wrong and what was written.
    Union alternatives (a severity that is neither a word nor a mapping) are reported once."""
    out, seen = [], set()
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (
            p.startswith("function-") or "[" in p or p[:1].isupper())))
        if loc in seen:
            continue
        seen.add(loc)
        where = ".".join(str(p) for p in loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown field '{loc[-1]}'{closest(str(loc[-1]), _field_names(model, loc[:-1]))}"
        elif isinstance(err.get("input"), (str, int, float, bool)) and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        out.append((str(path), line_for(lines, loc), f"{where}: {msg}" if where else msg))
    return out


def closest(word: str, options: list[str]) -> str:
    """A "did you mean" hint: the option closest to `word`, or an empty string."""
    match = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""
