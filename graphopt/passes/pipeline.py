"""Pipelines as data: from Python, from a spec string, or from a YAML/TOML file.

    "fold-constants,fold-batchnorm,prune-magnitude(sparsity=0.5)"
    passes: [fold-constants, {name: prune-magnitude, sparsity: 0.5}]      # YAML
    [[passes]]\nname = "prune-magnitude"\nsparsity = 0.5                  # TOML
"""
from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

from graphopt.ir.errors import PipelineError, bounded
from graphopt.passes import registry
from graphopt.passes.base import Pass


# A pipeline is a few dozen lines: bound what a hostile file may make the parser build.
MAX_PIPELINE_BYTES = 1 << 20
MAX_PIPELINE_DEPTH = 16
MAX_PIPELINE_NODES = 10_000
MAX_PIPELINE_ALIASES = 100


def _load_yaml(path: Path, text: str):
    """yaml.safe_load with aliases counted and nesting bounded before the document is built:
    nested aliases (billion laughs) expand exponentially."""
    import yaml

    aliases = 0
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_PIPELINE_ALIASES:
                raise PipelineError(f"{path}: more than {MAX_PIPELINE_ALIASES} YAML aliases; a pipeline needs none")
        elif isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_PIPELINE_DEPTH:
                raise PipelineError(f"{path}: nested deeper than {MAX_PIPELINE_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.safe_load(text)


def _check_size(path: Path, doc) -> None:
    """The parsed document, aliases expanded, holds at most MAX_PIPELINE_NODES values and nests at
    most MAX_PIPELINE_DEPTH deep (TOML has no aliases but nests too)."""
    stack, seen = [(doc, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_PIPELINE_NODES:
            raise PipelineError(f"{path}: pipeline holds more than {MAX_PIPELINE_NODES} values")
        if depth > MAX_PIPELINE_DEPTH:
            raise PipelineError(f"{path}: nested deeper than {MAX_PIPELINE_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in (*value.keys(), *value.values()))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


class Pipeline(list):
    """A list of pass instances; `str()` gives back a spec that parses to the same pipeline."""

    @classmethod
    def parse(cls, spec: str) -> "Pipeline":
        items = [s.strip() for s in _split_top(spec, ",") if s.strip()]
        if not items:
            raise PipelineError(f"empty pass spec {spec!r}")
        return cls(_parse_item(item) for item in items)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Pipeline":
        path = Path(path)
        try:
            if path.stat().st_size > MAX_PIPELINE_BYTES:
                raise PipelineError(f"{path}: pipeline file is {path.stat().st_size} bytes, over the "
                                    f"{MAX_PIPELINE_BYTES}-byte limit")
            text = path.read_text()
            doc = tomllib.loads(text) if path.suffix == ".toml" else _load_yaml(path, text)
        except PipelineError:
            raise
        except (OSError, ValueError) as e:  # yaml.YAMLError and TOMLDecodeError are ValueErrors or below
            raise PipelineError(f"{path}: cannot read pipeline ({bounded(e, 300)})") from None
        except Exception as e:  # noqa: BLE001 - yaml raises its own hierarchy
            raise PipelineError(f"{path}: cannot parse pipeline ({bounded(e, 300)})") from None
        _check_size(path, doc)
        entries = doc.get("passes") if isinstance(doc, dict) else doc
        if not isinstance(entries, list) or not entries:
            raise PipelineError(f"{path}: expected a list of passes under 'passes'")
        try:
            return cls(_from_entry(path, e) for e in entries)
        except PipelineError as e:
            message = str(e)
            raise PipelineError(message if message.startswith(f"{path}:") else f"{path}: {message}") from None

    def __str__(self) -> str:
        return ",".join(repr(p) for p in self)


def _from_entry(path: Path, entry) -> Pass:
    if isinstance(entry, str):
        return _parse_item(entry)
    if isinstance(entry, dict) and "name" in entry:
        options = {k: v for k, v in entry.items() if k != "name"}
        return registry.create(entry["name"], options)
    if isinstance(entry, dict) and len(entry) == 1:
        (name, options), = entry.items()
        return registry.create(name, options or {})
    raise PipelineError(f"{path}: cannot read pass entry {bounded(repr(entry), 200)}")


def _parse_item(item: str) -> Pass:
    if "(" not in item:
        return registry.create(item, {})
    if not item.endswith(")"):
        raise PipelineError(f"pass spec {item!r}: missing ')'")
    name, body = item[:-1].split("(", 1)
    options = {}
    for arg in _split_top(body, ","):
        if not arg.strip():
            continue
        if "=" not in arg:
            raise PipelineError(f"pass spec {item!r}: option {arg.strip()!r} needs key=value")
        key, value = arg.split("=", 1)
        options[key.strip()] = _literal(value.strip())
    return registry.create(name.strip(), options)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        return {"true": True, "false": False, "none": None}.get(lowered, text)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise PipelineError(f"pass spec {text!r}: unbalanced brackets or quotes")
    parts.append(text[start:])
    return parts
