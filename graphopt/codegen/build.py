"""ONNX -> Relax -> `tvm.compile` -> one shared library per target, with its manifest.

    result = compile("model.onnx", "x86", "out")     # out/model.x86.so, out/manifest.json

Shapes: the library is static-shaped. Symbolic dimensions (a batch "N") are fixed to 1 unless
`shapes` gives the input's full shape; static shapes are what MetaSchedule tunes, and the runtime
checks every call against them.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from graphopt.codegen import backends, host_encoders, int8_import, int8_kernels, manifest, onnx_import
from graphopt.codegen.targets import Target, fcompile, resolve, tvm_error_summary
from graphopt.ir import io
from graphopt.ir.errors import CodegenError
from graphopt.ir.graph import export

# Handled by the frontend outside its convert map.
_FRONTEND_BUILTIN_OPS = frozenset({"Constant", "If"})
_UNSUPPORTED_SHOWN = 10
# The attribute MetaScheduleApplyDatabase sets on each kernel it found a schedule for.
_SCHEDULED = "tirx.is_scheduled"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class BuildResult:
    library: Path
    manifest_path: Path
    manifest: dict
    seconds: float
    host: tuple[str, ...] = ()  # what runs on the host around the library, one line each


def compile(model: onnx.ModelProto | gs.Graph | str | os.PathLike, target: Target | str,
            out_dir: str | os.PathLike, *, name: str = "model", database: str | os.PathLike | None = None,
            shapes: Mapping[str, Sequence[int]] | None = None) -> BuildResult:
    """Compile `model` for `target` into `out_dir/<name>.<target>.so` and describe it in
    `out_dir/manifest.json`; both are written atomically.

    `database` is a MetaSchedule database folder (from the tuner); its schedules are applied to
    the kernels it knows, and the manifest says how many. `shapes` overrides input shapes by name.
    """
    start = time.perf_counter()
    if not _NAME.fullmatch(name):
        raise CodegenError(f"library name '{name}' must be letters, digits, '_', '.' or '-'")
    target = resolve(target) if isinstance(target, str) else target
    proto, digest = _read(model)
    # String lookups at the inputs run on the host (host_encoders); the library takes their numbers.
    hosted = host_encoders.split(proto)
    check_supported(hosted.model)
    mod = to_relax(hosted.model, hosted.library_shapes(shapes), target)
    int8 = int8_kernels.instruction_used(mod) or ("generic" if _has_integer_ops(hosted.model) else None)
    arguments = _tensor_specs(proto_inputs(hosted.model), mod["main"].params)
    signature = {"inputs": hosted.user_inputs([i.name for i in proto_inputs(proto)], arguments),
                 "host_encoders": [e.to_json() for e in hosted.encoders],
                 "outputs": _output_specs(proto, mod["main"].ret_ty)}
    tuned = None
    if database is not None:
        mod, tuned = apply_database(mod, target, database)
    executable = _tvm_compile(mod, target)
    library = Path(out_dir) / f"{name}.{target.name}.so"
    linker = fcompile(target)
    device_code = _export(executable, target, library, linker)
    entry = _entry(target, tuned, device_code, int8, " ".join(linker.command), time.perf_counter() - start)
    model_info = {"name": name, "model_sha256": digest, **signature}
    written = manifest.record(library.parent, model_info, library.name, entry)
    return BuildResult(library, library.parent / manifest.FILENAME, written, time.perf_counter() - start,
                       tuple(e.describe() for e in hosted.encoders))


def check_supported(model: onnx.ModelProto) -> None:
    """Raise CodegenError naming every node (in subgraphs too) whose op graphopt cannot import."""
    known = onnx_import.known_ops() | _FRONTEND_BUILTIN_OPS
    # Calls of model-local functions are inlined before import: their bodies are what must convert.
    local = {(f.domain, f.name) for f in model.functions}
    nodes = [*_all_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    missing = [n for n in nodes if (n.domain, n.op_type) not in local
               and (n.op_type not in known or onnx_import.foreign(n))]
    if not missing:
        return
    shown = "; ".join(f"node '{n.name or '(unnamed)'}' ({n.op_type})" for n in missing[:_UNSUPPORTED_SHOWN])
    more = f"; and {len(missing) - _UNSUPPORTED_SHOWN} more" if len(missing) > _UNSUPPORTED_SHOWN else ""
    raise CodegenError(f"TVM's ONNX frontend cannot convert {shown}{more}")


def to_relax(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None,
             target: Target | None = None):
    """The model as a static-shaped Relax IRModule with its weights bound as constants.

    Converters that choose kernels by target (the int8 ones) read `target` as TVM's current
    target; without one they emit target-independent Relax."""
    shape_dict = static_shapes(model, shapes or {})
    try:
        with target.tvm_target() if target is not None else nullcontext():
            return onnx_import.from_onnx(model, shape_dict)
    except CodegenError as e:
        raise CodegenError(f"{e}{_defaulted_note(model, shapes or {})}") from e
    except Exception as e:  # noqa: BLE001 - the frontend raises anything from its converters
        raise CodegenError(f"TVM's ONNX frontend failed: {tvm_error_summary(e)}"
                           f"{_defaulted_note(model, shapes or {})}") from e


def static_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Each graph input's shape: `shapes[name]` where given, else its declared shape with every
    symbolic dimension set to 1."""
    inputs = {i.name: i for i in proto_inputs(model)}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise CodegenError(f"shapes given for {', '.join(unknown)}, which are not model inputs "
                           f"(inputs: {', '.join(inputs)})")
    return {name: _input_shape(info, shapes.get(name)) for name, info in inputs.items()}


def _defaulted_note(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> str:
    """What to add to an import error when symbolic dims were set to 1: a width of 1 may be what
    broke the model (a pooled width of 0, a Reshape that no longer fits)."""
    fixed = []
    for info in proto_inputs(model):
        symbolic = [d.dim_param or "?" for d in info.type.tensor_type.shape.dim if not d.HasField("dim_value")]
        if symbolic and info.name not in shapes:
            fixed.append(f"{info.name}: {', '.join(symbolic)}")
    if not fixed:
        return ""
    return (f"; the symbolic dims {'; '.join(fixed)} were set to 1: give the real input shapes "
            f"(--input-shape NAME=D0,D1,...)")


def _input_shape(info: onnx.ValueInfoProto, override: Sequence[int] | None) -> list[int]:
    tensor = info.type.tensor_type
    if not tensor.HasField("shape"):
        if override is None:
            raise CodegenError(f"input '{info.name}' has no declared shape; give one with `shapes`")
        return [int(d) for d in override]
    declared = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if override is None:
        return [1 if d is None else d for d in declared]
    if len(override) != len(declared) or any(d is not None and d != int(o) for d, o in zip(declared, override)):
        raise CodegenError(f"shape {list(override)} for input '{info.name}' does not fit its declared "
                           f"shape {['?' if d is None else d for d in declared]}")
    return [int(d) for d in override]


def lower_for_tuning(mod, target: Target):
    """Relax with every operator lowered and fused into TIR kernels: the workloads MetaSchedule
    tunes and a database is keyed by (the target's backend's `lowering_passes`). The tuner and
    `apply_database` both use it, so the keys a database is written with are the ones looked up."""
    import tvm

    with target.tvm_target():
        return tvm.transform.Sequential(backends.of(target).lowering_passes(target))(mod)


def apply_database(mod, target: Target, database: str | os.PathLike):
    """Lower `mod` and schedule each kernel the MetaSchedule database in `database` has a record
    for. Returns the module and {"path", "kernels", "tuned"} for the manifest."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    folder = Path(database)
    files = [folder / "database_workload.json", folder / "database_tuning_record.json"]
    if not all(f.is_file() for f in files):
        raise CodegenError(f"{folder}: no MetaSchedule database (expected {files[0].name} and "
                           f"{files[1].name}); tune first, e.g. `graphopt compile MODEL --tune --db {folder}`")
    lowered = lower_for_tuning(mod, target)
    with target.tvm_target(), ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False):
        scheduled = relax.transform.MetaScheduleApplyDatabase()(lowered)
    kernels = _kernels(scheduled)
    tuned = sum(1 for f in kernels if f.attrs is not None and _SCHEDULED in f.attrs)
    return scheduled, {"path": str(folder.resolve()), "kernels": len(kernels), "tuned": tuned}


def proto_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (older exporters list initializers as inputs too)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _read(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, gs.Graph):
        model = export(model)
    if isinstance(model, onnx.ModelProto):
        return model, hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    # The file's own bytes, so the digest matches `sha256sum model.onnx`.
    return io.load_model(model), hashlib.sha256(Path(model).read_bytes()).hexdigest()


def _has_integer_ops(model: onnx.ModelProto) -> bool:
    """Whether the model has an integer conv or matmul (QLinearConv, MatMulInteger, ...)."""
    nodes = [*_all_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    return any(n.op_type in int8_import.CONVERTERS for n in nodes)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _all_nodes(sub)


def _tensor_specs(infos: list[onnx.ValueInfoProto], params) -> list[dict]:
    return [{"name": info.name, **_type_spec(p.ty)} for info, p in zip(infos, params, strict=True)]


def _output_specs(model: onnx.ModelProto, ret) -> list[dict]:
    from tvm import relax

    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    names = [o.name for o in model.graph.output]
    if len(fields) != len(names):
        raise CodegenError(f"the compiled model returns {len(fields)} values for {len(names)} graph outputs")
    return [{"name": n, **_type_spec(f)} for n, f in zip(names, fields)]


def _type_spec(ty) -> dict:
    from tvm import relax, tirx

    if not isinstance(ty, relax.TensorType) or ty.ndim < 0:
        raise CodegenError(f"a model input or output has no known tensor shape after conversion ({ty})")
    if not isinstance(ty.shape, relax.ShapeExpr):  # dims only the run knows (a Loop's scan outputs)
        return {"shape": ["?"] * ty.ndim, "dtype": str(ty.dtype)}
    dims = [int(d) if isinstance(d, tirx.IntImm) else str(d) for d in ty.shape.values]
    return {"shape": dims, "dtype": str(ty.dtype)}


def _tvm_compile(mod, target: Target):
    try:
        return backends.of(target).compile(mod, target)
    except Exception as e:  # noqa: BLE001 - TVM raises many unrelated types
        raise CodegenError(f"TVM could not compile the model for {target.name}: {tvm_error_summary(e)}") from e


def _export(executable, target: Target, library: Path, linker) -> str | None:
    """Write the library atomically; return how device code is embedded (None for CPU)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: the linker creates the file, so it gets the usual permissions.
    staged = library.with_name(f".{library.name}.{secrets.token_hex(6)}.so")
    try:
        device_code = backends.of(target).export(executable, target, staged, linker)
        os.replace(staged, library)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return device_code


def _entry(target: Target, tuned: dict | None, device_code: str | None, int8: str | None, linker: str,
           seconds: float) -> dict:
    """The manifest's entry for one library. "int8_instruction": what its packed int8 kernels
    multiply with ("amx", "vnni", "sdot"), "generic" where its integer ops have none, None
    without integer ops; the loader requests AMX from Linux for "amx"."""
    import tvm
    import tvm_ffi

    return {"target": target.name, "tvm_target": target.tvm, "tvm_host": target.host,
            "device": target.device, "linker": linker, "database": tuned,
            "cuda_device_code": device_code, "int8_instruction": int8, "graphopt_version": _graphopt_version(),
            "tvm_version": tvm.__version__, "tvm_ffi_version": tvm_ffi.__version__,
            "build_seconds": round(seconds, 3)}


def _graphopt_version() -> str:
    try:
        return importlib.metadata.version("graphopt")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _kernels(mod) -> list:
    from tvm import tirx

    return [f for _, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
