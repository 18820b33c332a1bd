"""`manifest.json`: what each library in an output folder was built from, for what, and how.

One manifest describes one model (its SHA-256 and its inputs and outputs) and every library built
from it into the folder, keyed by file name, so `-o out --target x86` then `-o out --target arm`
leaves both libraries described. A build of a different model (or the same model with other
input shapes) starts a fresh manifest.

"inputs" are the model's inputs as the loader takes them. "host_encoders" lists what runs on the
host before the library (`host_encoders.Encoder.to_json`: the string lookups at the model's
inputs, with their tables), empty when nothing does; the library then takes each encoder's
output in its string input's place (`host_encoders.library_arguments`).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from graphopt.ir.errors import CodegenError

FILENAME = "manifest.json"
FORMAT = "graphopt-codegen/1"
# Fields that identify the model; the libraries of a manifest all share them.
MODEL_KEYS = ("format", "name", "model_sha256", "inputs", "host_encoders", "outputs")


def record(out_dir: Path, model: dict, library: str, entry: dict) -> dict:
    """Add (or replace) `library`'s entry in `out_dir`'s manifest, written atomically; return it."""
    path = out_dir / FILENAME
    manifest = {"format": FORMAT, **model, "libraries": {}}
    current = _read_json(path) if path.exists() else None
    if current and all(current.get(k) == manifest.get(k) for k in MODEL_KEYS):
        manifest["libraries"] = {name: e for name, e in current.get("libraries", {}).items()
                                 if (out_dir / name).exists()}
    manifest["libraries"][library] = entry
    _write_json(path, manifest)
    return manifest


def describe(library: Path) -> tuple[dict, dict]:
    """The manifest beside `library` and `library`'s entry in it; CodegenError if it has none."""
    path = library.parent / FILENAME
    if not path.exists():
        raise CodegenError(f"{library}: no {FILENAME} beside it; graphopt writes one with every "
                           "library it builds, so rebuild it with `graphopt compile`")
    manifest = _read_json(path)
    if manifest.get("format") != FORMAT:
        raise CodegenError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; rebuild the library")
    entry = manifest.get("libraries", {}).get(library.name)
    if entry is None:
        known = ", ".join(manifest.get("libraries", {})) or "none"
        raise CodegenError(f"{path} does not describe {library.name} (it describes: {known}); a "
                           "later build of another model into this folder replaced it; rebuild")
    return manifest, entry


def describe_folder(folder: Path) -> list[str]:
    """The libraries `folder`'s manifest describes that are present."""
    path = folder / FILENAME
    if not path.exists():
        raise CodegenError(f"{folder}: no {FILENAME}; not a folder graphopt compiled into")
    return [name for name in _read_json(path).get("libraries", {}) if (folder / name).is_file()]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CodegenError(f"{path}: cannot read the manifest ({e})") from None
    if not isinstance(data, dict):
        raise CodegenError(f"{path}: the manifest is not a JSON object")
    return data


def _write_json(path: Path, data: dict) -> None:
    # Not mkstemp, whose 0600 would survive the rename.
    staged = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    try:
        with open(staged, "x") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
