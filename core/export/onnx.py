"""Export a base model with adapters to ONNX, verified in ONNX Runtime (``adapterkit export onnx``).

Two modes (docs/onnx.md):

- ``merged``: one adapter becomes part of the graph. The method's
  :class:`~adapterkit.TraceExport` capability readies the model
  (without it: a mergeable adapter is merged, and a non-mergeable one's
  modules, such as bottleneck adapters or virtual tokens, to be traced as they are).
- ``swappable``: the base is exported once and every adapted module reads its
  low-rank factors ``<module>.lora_A.weight`` ``[in, r]`` and ``<module>.lora_B.weight``
  ``[r, out]`` (scale folded in) as graph inputs with a symbolic rank per module.
  Each input has a rank-0 default (an initializer of the same name), so a session
  without an adapter runs the base model; each adapter is written beside the model
  as an ONNX Runtime ``.onnx_adapter`` file with exactly those names, which
  ``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter`` activate per run.
  The factors come from :meth:`~adapterkit.core.plugin.method.Method.export_factors`.

Both modes take ``input_ids`` and ``attention_mask`` (int64, dynamic batch and
sequence) and give ``logits`` (or ``last_hidden_state``), float32, no KV cache.
Unless ``verify=False``, the export is run in ONNX Runtime (CPU) on inputs of
another shape than the traced ones and compared with the torch model with the
adapter applied (``adapterkit.apply``, not merged), run in float32 and, when a
float64 copy fits in memory, in float64 (the exact answer). The export passes when
its output is within ``atol + rtol * max|torch output|`` of either; otherwise it
fails and nothing is written. Both distances, and torch's own float32 distance
from float64, go into the manifest. Why both: two float32 computations of a deep
model differ by their rounding, and on a badly conditioned input torch's float32
run can be the one further from the exact answer (docs/onnx.md, Verification).
The output folder appears atomically.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.errors import AdapterkitError, UsageError
from adapterkit.core.export.files import (
    ADAPTERS_DIR,
    DATA_NAME,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    MODEL_NAME,
    ExportCheck,
    check_export,
    describe_model,
    file_sizes,
    finalize_model,
    write_manifest,
)
from adapterkit.core.export.swappable import ModuleFactors, adapter_factors, factor_parameters
from adapterkit.core.format.onnx_adapter_file import input_names, write_adapter_file
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.io import atomic_directory
from adapterkit.core.plugin.capabilities import can_merge
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.core.runtime.models import load_base

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "EXPORTERS", "MODES", "ExportCheck", "check_export", "export_onnx"]

MODES = ("merged", "swappable")
#: the torch exporters: auto (dynamo where torchscript cannot trace), torchscript, dynamo
EXPORTERS = ("auto", "torchscript", "dynamo")
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5
AdapterLike = Adapter | str | os.PathLike[str]


def export_onnx(
    adapter_or_path: AdapterLike | Sequence[AdapterLike] | Mapping[str, AdapterLike],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "merged",
    opset: int | None = None,
    exporter: str = "auto",
    batch: int = 2,
    seq_len: int = 8,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    adapter_version: int = 1,
    model_version: int = 1,
    overwrite: bool = False,
    registry: Registry | None = None,
    progress: Callable[[str], Any] | None = None,
) -> Path:
    """Export ``base_dir`` with the adapter(s) to the new folder ``out_dir``; returns ``out_dir``.

    :param adapter_or_path: an :class:`Adapter` or a path (any installed format). In
        swappable mode also several: a list, or a mapping name -> adapter (the names
        of the ``adapters/<name>.onnx_adapter`` files; by default each adapter's folder name).
    :param base_dir: local Hugging Face model folder (config.json + safetensors).
    :param mode: ``"merged"`` or ``"swappable"``.
    :param opset: ONNX opset (default 18).
    :param exporter: ``"auto"`` (torchscript, then dynamo if it fails), ``"torchscript"`` or ``"dynamo"``.
    :param batch: batch size of the traced example (>= 2; the exported model takes any).
    :param seq_len: sequence length of the traced example (>= 2; the exported model takes any).
    :param verify: compare ONNX Runtime with torch (adapter applied; float32, and float64 when it fits in
        memory); fail when it is more than ``atol + rtol * max|torch output|`` from both somewhere.
    :param atol: ``rtol``: the tolerance of that comparison.
    :param adapter_version: ``model_version``: the versions written into each ``.onnx_adapter`` file.
    :param progress: called with a short line per stage (the CLI prints them to stderr).
    """
    _require("torch", "transformers", "onnx", "onnxruntime")
    from adapterkit.core.export import trace as onnx_trace

    registry = registry or default_registry()
    if mode not in MODES:
        raise UsageError(f"unknown export mode {mode!r}", expected=list(MODES), code="bad_option")
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}", expected=list(EXPORTERS), code="bad_option")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise UsageError(f"{name} must be an integer >= 2", found=value, code="bad_option",
                             hint="sizes 0 and 1 would be fixed into the graph by the exporter; "
                                  "the exported model still takes any size")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise UsageError(f"{name} must be a number >= 0", found=value, code="bad_option")
    opset = int(opset) if opset is not None else onnx_trace.DEFAULT_OPSET
    adapters = _load_adapters(adapter_or_path, registry, Path(base_dir))  # a reader may need the base (PEFT prompts)
    if mode == "merged" and len(adapters) != 1:
        raise UsageError("merged mode exports exactly one adapter", found=len(adapters), code="bad_option",
                         hint="use --mode swappable to serve several adapters from one model")
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise UsageError("the output folder is the base model folder", file=str(out_dir),
                         hint="write the export to a new folder", code="output_is_input")
    say = progress or (lambda _line: None)
    job = _Job(adapters, base_dir, registry, opset, exporter, batch, seq_len, verify, (float(atol), float(rtol)), say)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if mode == "merged":
            job.merged(tmp)
        else:
            job.swappable(tmp, adapter_version, model_version)
    return out_dir


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the ONNX export needs {', '.join(missing)}", found=missing, code="missing_dependency",
                         hint="pip install torch transformers onnx onnxruntime (and onnxscript for --exporter dynamo)")


# ---- adapters in -----------------------------------------------------------------------

def _load_adapters(value: Any, registry: Registry, base: Path | None = None) -> dict[str, Adapter]:
    from adapterkit.core.store.adapters import load

    if isinstance(value, (Adapter, str, os.PathLike)):
        items: list[tuple[str | None, Any]] = [(None, value)]
    elif isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, Sequence):
        items = [(None, v) for v in value]
    else:
        raise UsageError("adapters must be an Adapter, a path, a list of them or a mapping name -> adapter",
                         found=type(value).__name__, code="bad_option")
    if not items:
        raise UsageError("no adapter to export", code="bad_option")
    out: dict[str, Adapter] = {}
    for index, (name, item) in enumerate(items):
        adapter = item if isinstance(item, Adapter) else load(item, base=base, registry=registry)
        if name is None:
            source = Path(item) if not isinstance(item, Adapter) else adapter.source
            name = (source.name if source.is_dir() else source.stem) if source is not None else f"adapter{index}"
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or f"adapter{index}"
        if name in out:
            raise UsageError(f"two adapters are named {name!r}", code="duplicate_adapter",
                             hint="each adapter is named after its folder (or file): give them distinct names, "
                                  "or pass a mapping name -> adapter to export_onnx")
        out[name] = adapter
    return out


# ---- the job ----------------------------------------------------------------------------

class _Job:
    def __init__(self, adapters: dict[str, Adapter], base_dir: Path, registry: Registry, opset: int, exporter: str,
                 batch: int, seq_len: int, verify: bool, tolerance: tuple[float, float], say: Callable[[str], Any]):
        self.adapters, self.base_dir, self.registry = adapters, base_dir, registry
        self.opset, self.exporter, self.batch, self.seq_len = opset, exporter, batch, seq_len
        self.verify, (self.atol, self.rtol), self.say = verify, tolerance, say
        self.check_tokens = "random"
        self.float64_skipped: str | None = None  # why the float64 reference is not run, once known

    # -- merged --
    def merged(self, tmp: Path) -> None:
        from adapterkit.core.export import trace as T
        from adapterkit.core.runtime.inject import apply

        (name, adapter), = self.adapters.items()
        method = self.registry.method(adapter.method)
        self.say(f"loading {self.base_dir} and applying the {adapter.method} adapter")
        model = load_base(self.base_dir)
        apply(adapter, model, registry=self.registry)
        trace, check = self._inputs(model)
        output, example = T.output_name(model, trace)
        reference = T.logits_numpy(model, check, output) if self.verify else None
        exact = self._float64_reference(model, check, output, adapter) if self.verify else None
        in_graph = "merged" if can_merge(method) and method.merge_refusal(adapter.config) is None else "traced"
        work = tmp / ".trace"
        work.mkdir()
        with T.prepare_export(method, model, "merged") as traced:
            wrapper = T.ExportWrapper(traced, output)
            spec = self._spec(trace, output, example, [])
            self.say(f"tracing with the {self.exporter} exporter (opset {self.opset})")
            used = T.run_exporter(wrapper, spec, work / MODEL_NAME, self.exporter, self.opset)
        finalize_model(work / MODEL_NAME, tmp, metadata=self._metadata("merged", adapter))
        _remove_tree(work)
        verification = None
        if reference is not None:
            self.say("verifying in ONNX Runtime")
            session = _session(tmp / MODEL_NAME)
            diffs = {name: _compare(_run(session, _feeds(check)), reference, exact)}
            verification = self._verdict(check, diffs)
        self._manifest(tmp, "merged", used, output, verification, adapter={
            "name": name, "method": adapter.method, "targets": len(adapter.targets), "in_graph": in_graph,
            "source_format": adapter.source_format})

    # -- swappable --
    def swappable(self, tmp: Path, adapter_version: int, model_version: int) -> None:
        import copy

        import torch

        from adapterkit.core.export import trace as T
        from adapterkit.core.runtime.inject import apply

        factors = {name: adapter_factors(adapter, self.registry) for name, adapter in self.adapters.items()}
        self.say(f"loading {self.base_dir}")
        model = load_base(self.base_dir)
        shapes = _module_shapes(factors)
        order = {path: i for i, (path, _) in enumerate(model.named_modules())}
        modules = sorted(shapes, key=lambda p: (order.get(p, len(order)), p))
        trace, check = self._inputs(model)
        output, example = T.output_name(model, trace)
        base_reference = T.logits_numpy(model, check, output) if self.verify else None
        base_exact = self._float64_reference(model, check, output, None) if self.verify else None
        pristine = copy.deepcopy(model) if self.verify else None
        slot = T.FactorSlot()
        handles = T.install_factor_hooks(model, modules, slot)
        names: list[str] = []
        args: list[torch.Tensor] = []
        dynamic: dict[str, dict[int, str]] = {}
        for path in modules:
            fan_in, fan_out = shapes[path]
            name_a, name_b = input_names(path)
            rank = "rank_" + path.replace(".", "_")
            names += [name_a, name_b]
            args += [torch.zeros(fan_in, T.TRACE_RANK), torch.zeros(T.TRACE_RANK, fan_out)]
            dynamic[name_a], dynamic[name_b] = {1: rank}, {0: rank}
        work = tmp / ".trace"
        work.mkdir()
        try:
            wrapper = T.ExportWrapper(model, output, slot, modules)
            spec = self._spec(trace, output, example, names, args, dynamic)
            self.say(f"tracing with the {self.exporter} exporter (opset {self.opset}), {len(modules)} adapted modules")
            used = T.run_exporter(wrapper, spec, work / MODEL_NAME, self.exporter, self.opset)
        finally:
            for handle in handles:
                handle.remove()
        defaults: dict[str, np.ndarray] = {}
        for path in modules:
            fan_in, fan_out = shapes[path]
            name_a, name_b = input_names(path)
            defaults[name_a] = np.zeros((fan_in, 0), np.float32)
            defaults[name_b] = np.zeros((0, fan_out), np.float32)
        finalize_model(work / MODEL_NAME, tmp, defaults=defaults,
                       metadata=self._metadata("swappable", None))
        _remove_tree(work)
        (tmp / ADAPTERS_DIR).mkdir()
        entries = {}
        for name, adapter in self.adapters.items():
            file = f"{ADAPTERS_DIR}/{name}.onnx_adapter"
            write_adapter_file(factor_parameters(factors[name]), tmp / file, adapter_version=adapter_version,
                               model_version=model_version)
            entries[name] = {"file": file, "method": adapter.method, "modules": len(factors[name]),
                             "ranks": sorted({f.rank for f in factors[name].values()}),
                             "source_format": adapter.source_format}
        verification = None
        if base_reference is not None and pristine is not None:
            verification = self._verify_swappable(tmp, check, output, (base_reference, base_exact), pristine,
                                                  entries, apply, T)
        self._manifest(tmp, "swappable", used, output, verification, adapters=entries, factor_inputs={
            path: {"A": input_names(path)[0], "B": input_names(path)[1], "in": shapes[path][0],
                   "out": shapes[path][1], "rank": "rank_" + path.replace(".", "_")} for path in modules},
            versions={"adapter_version": adapter_version, "model_version": model_version})

    def _verify_swappable(self, tmp: Path, check: Mapping[str, Any], output: str,
                          base: tuple[np.ndarray, np.ndarray | None], pristine: Any,
                          entries: Mapping[str, Mapping[str, Any]], apply: Any, T: Any) -> dict[str, Any]:
        import copy

        import onnxruntime as ort

        self.say(f"verifying in ONNX Runtime: no adapter and {len(entries)} adapter(s), one session")
        session = _session(tmp / MODEL_NAME)
        feeds = _feeds(check)
        diffs = {"(no adapter)": _compare(_run(session, feeds), *base)}
        for name, entry in entries.items():
            model = copy.deepcopy(pristine)
            apply(self.adapters[name], model, registry=self.registry)
            reference = T.logits_numpy(model, check, output)
            del model
            exact = self._float64_reference(pristine, check, output, self.adapters[name])
            lora = ort.LoraAdapter()
            lora.Load(str(tmp / entry["file"]))
            options = ort.RunOptions()
            options.add_active_adapter(lora)
            diffs[name] = _compare(_run(session, feeds, options), reference, exact)
        diffs["(no adapter, after switching)"] = _compare(_run(session, feeds), *base)
        return self._verdict(check, diffs)

    def _float64_reference(self, model: Any, check: Mapping[str, Any], output: str,
                           adapter: Adapter | None) -> np.ndarray | None:
        """The base in float64 with ``adapter`` applied (None: the base alone) on the check inputs: the
        exact answer, next to torch's own float32 run. None when it cannot run (the reason is recorded)."""
        import torch

        from adapterkit.core.export import trace as T
        from adapterkit.core.runtime.inject import apply

        if self.float64_skipped is None:
            self.float64_skipped = T.float64_room(model) or ""
        if self.float64_skipped:
            return None
        try:
            exact_model = load_base(self.base_dir, torch.float64)
            if adapter is not None:
                apply(adapter, exact_model, registry=self.registry)
            return T.logits_numpy(exact_model, check, output)
        except Exception as exc:  # layers without float64 kernels (bitsandbytes' 4-bit ones): float32 only
            first_line = next(iter(str(exc).strip().splitlines()), "")
            self.float64_skipped = f"{type(exc).__name__}: {first_line[:200]}"
            return None

    # -- shared --
    def _inputs(self, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Trace inputs (batch x seq_len, random ids) and check inputs of another shape
        (batch + 1 x seq_len + 5): text through the base's tokenizer when it has one, else random ids."""
        from adapterkit.core.export import trace as T

        trace = T.sample_inputs(model, self.batch, self.seq_len, seed=0)
        shape = (self.batch + 1, self.seq_len + 5)
        check = T.text_inputs(self.base_dir, model, *shape)
        self.check_tokens = "text" if check is not None else "random"
        return trace, check or T.sample_inputs(model, *shape, seed=1)

    def _spec(self, trace: Mapping[str, Any], output: str, example: Any, names: list[str],
              args: Sequence[Any] = (), dynamic: Mapping[str, dict[int, str]] | None = None) -> Any:
        from adapterkit.core.export import trace as T

        token_axes = {0: "batch", 1: "sequence"}
        out_axes = {0: "batch"}
        if example.ndim >= 3:
            out_axes[1] = "sequence" if example.shape[1] == self.seq_len else "output_sequence"
        return T.TraceSpec(
            args=(trace["input_ids"], trace["attention_mask"], *args),
            input_names=["input_ids", "attention_mask", *names], output_names=[output],
            dynamic={"input_ids": token_axes, "attention_mask": dict(token_axes), **(dynamic or {})},
            output_dynamic={output: out_axes},
        )

    def _verdict(self, check: Mapping[str, Any], diffs: dict[str, _Comparison]) -> dict[str, Any]:
        """Pass or raise: each output within the bound of torch's float32 run or of its float64 run."""
        shape = list(check["input_ids"].shape)
        bounds = {name: self.atol + self.rtol * c.scale for name, c in diffs.items()}
        failed = {name: c for name, c in diffs.items() if not c.within(bounds[name])}
        if failed:
            raise AdapterkitError(
                "ONNX Runtime's outputs differ from the torch model's",
                found={name: c.describe() for name, c in failed.items()}, code="verification_failed",
                expected={name: _expected(bounds[name], c) for name, c in failed.items()},
                hint=f"the bound is atol {self.atol:g} + rtol {self.rtol:g} * max|output| (from float64: plus twice "
                     "torch float32's own distance from it); the export was not written; raise --atol / --rtol "
                     "if float32 rounding explains it, or try the other --exporter")
        record: dict[str, Any] = {
            "provider": "CPUExecutionProvider",
            "inputs": {"batch": shape[0], "sequence": shape[1], "tokens": self.check_tokens},
            "atol": self.atol, "rtol": self.rtol,
            "reference": "torch float32" + (" and float64" if not self.float64_skipped else ""),
            "max_abs_diff": {name: c.float32 for name, c in diffs.items()},
            "max_abs_output": {name: c.scale for name, c in diffs.items()},
        }
        exact = {name: c for name, c in diffs.items() if c.float64 is not None}
        if exact:
            record["max_abs_diff_float64"] = {name: c.float64 for name, c in exact.items()}
            record["torch_float32_vs_float64"] = {name: c.torch_rounding for name, c in exact.items()}
            record["bound_float64"] = {name: c.exact_bound(bounds[name]) for name, c in exact.items()}
        if self.float64_skipped:
            record["float64_skipped"] = self.float64_skipped
        return record

    def _metadata(self, mode: str, adapter: Adapter | None) -> dict[str, str]:
        import adapterkit

        meta = {"adapterkit.version": adapterkit.__version__, "adapterkit.mode": mode}
        if adapter is not None:
            meta["adapterkit.method"] = adapter.method
        return meta

    def _manifest(self, tmp: Path, mode: str, exporter: str, output: str, verification: dict[str, Any] | None,
                  **extra: Any) -> None:
        import adapterkit
        from adapterkit.core.format.base_model import read_base_model

        described = describe_model(tmp / MODEL_NAME)
        info = read_base_model(self.base_dir)
        base = {k: v for k, v in (("name", info.config.get("_name_or_path") or None),
                                  ("model_type", info.model_type), ("architecture", info.architecture)) if v}
        manifest = {
            "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "mode": mode,
            "model": MODEL_NAME, "external_data": DATA_NAME, "exporter": exporter, "opset": self.opset,
            "dtype": "float32", "inputs": described["inputs"], "outputs": described["outputs"], "output": output,
            "base_model": base, "files": file_sizes(tmp), "created_by": f"adapterkit {adapterkit.__version__}",
            **extra,
        }
        if verification is not None:
            manifest["verification"] = verification
        write_manifest(tmp, manifest)


def _module_shapes(factors: Mapping[str, Mapping[str, ModuleFactors]]) -> dict[str, tuple[int, int]]:
    """Module -> (in, out) over every adapter; adapters that disagree on a module's shape are refused."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, modules in factors.items():
        for path, f in modules.items():
            shape = (f.in_features, f.out_features)
            if shapes.setdefault(path, shape) != shape:
                raise UsageError(f"adapter {name!r} adapts {path} as [in, out] = {list(shape)}, another as "
                                 f"{list(shapes[path])}", location=path,
                                 hint="a swappable model serves adapters of one base model", code="shape_mismatch")
    return shapes


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warning per factor input with a default initializer
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: Any, feeds: Mapping[str, np.ndarray], options: Any = None) -> np.ndarray:
    try:
        return session.run(None, dict(feeds), options)[0]
    except Exception as exc:  # onnxruntime's Fail / InvalidArgument
        shape = list(next(iter(feeds.values())).shape)
        raise AdapterkitError(
            f"the exported model fails in ONNX Runtime on inputs of shape {shape} (another shape than the "
            f"traced one): {type(exc).__name__}: {str(exc).strip()[:300]}", code="verification_failed",
            hint="a size was fixed while tracing: the method's modules must not turn tensor sizes into Python "
                 "ints (int(x.shape[0])); its plugin can subclass adapterkit.TraceExport to swap in "
                 "trace-friendly modules") from None


def _feeds(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


@dataclass(frozen=True)
class _Comparison:
    """ONNX Runtime's output against torch: max |ORT - torch float32|, max |ORT - torch float64| (None: not
    run), max |torch float32 - torch float64| (torch's own rounding) and max |torch output|."""

    float32: float
    float64: float | None
    torch_rounding: float | None
    scale: float

    def within(self, bound: float) -> bool:
        exact_bound = self.exact_bound(bound)
        return self.float32 <= bound or (exact_bound is not None and self.float64 is not None
                                         and self.float64 <= exact_bound)

    def exact_bound(self, bound: float) -> float | None:
        """The bound against float64: ``bound`` widened by twice torch's own float32 rounding. A zero bound
        (atol = rtol = 0) asks for torch's float32 output exactly, so there is no float64 route then."""
        if self.torch_rounding is None or bound <= 0:
            return None
        return bound + 2 * self.torch_rounding

    def describe(self) -> str:
        text = f"{self.float32:.3g} from torch float32"
        if self.float64 is not None:
            text += f", {self.float64:.3g} from float64 (torch float32: {self.torch_rounding:.3g} from float64)"
        return text


def _expected(bound: float, comparison: _Comparison) -> str:
    exact_bound = comparison.exact_bound(bound)
    text = f"<= {bound:.3g} from torch float32"
    return text if exact_bound is None else f"{text} or <= {exact_bound:.3g} from float64"


def _compare(found: np.ndarray, reference: np.ndarray, exact: np.ndarray | None) -> _Comparison:
    if found.shape != reference.shape:
        raise AdapterkitError("ONNX Runtime's output has another shape than the torch model's",
                              expected=list(reference.shape), found=list(found.shape), code="verification_failed")
    ort64 = found.astype(np.float64)
    return _Comparison(
        float32=float(np.abs(ort64 - reference).max(initial=0.0)),
        float64=None if exact is None else float(np.abs(ort64 - exact).max(initial=0.0)),
        torch_rounding=None if exact is None else float(np.abs(reference.astype(np.float64) - exact).max(initial=0.0)),
        scale=float(np.abs(reference).max(initial=0.0)))


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
