"""The torch side of the ONNX export: load the base, wire adapters for tracing, run the exporter.

Imports torch and transformers; :mod:`adapterkit.core.export.onnx` imports this
module only when an export runs.

Two exporters are supported (``exporter=``):

- ``"torchscript"``: ``torch.onnx.export(..., dynamo=False)`` with explicit
  ``input_names`` and ``dynamic_axes``. Fast (seconds for a 135M model's trace) and
  exact; it needs the ``attention_mask`` input, which the export always has.
- ``"dynamo"``: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript)
  with explicit ``dynamic_shapes`` (``torch.export.Dim`` for batch, sequence and each
  module's rank). Equally exact here, four to ten times slower.
- ``"auto"`` (default): torchscript, and dynamo when the torchscript exporter fails.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterkit.core.errors import AdapterkitError, BaseModelError, UsageError
from adapterkit.core.plugin.capabilities import TraceExport, can_merge
from adapterkit.core.plugin.method import Method

DEFAULT_OPSET = 18
#: rank of the example factors traced in swappable mode (any size but 0 and 1, which torch.export specialises)
TRACE_RANK = 3


# ---- the Method hook's default ------------------------------------------------

@contextlib.contextmanager
def prepare_export(method: Method, model: nn.Module, mode: str = "merged",
                   adapter_name: str = "default") -> Iterator[nn.Module]:
    """Ready ``model`` for tracing: the method's own way (:class:`~adapterkit.TraceExport`), else merge the
    adapter when the method can (undone on exit) and trace the injected modules otherwise."""
    if isinstance(method, TraceExport):
        with method.prepare_export(model, mode, adapter_name) as traced:
            yield traced
        return
    from adapterkit.core.runtime.inject import attached

    if mode != "merged":
        raise UsageError(f"method {method.name!r} has no ONNX export mode {mode!r}", expected="merged", code="bad_mode")
    handle = attached(model).get(adapter_name)
    config = handle.config if handle is not None else {}
    merge = can_merge(method) and method.merge_refusal(config) is None
    if merge:
        if handle is not None:
            handle.merge()
        else:
            method.merge(model, adapter_name)
    try:
        yield model
    finally:
        if merge:
            with contextlib.suppress(NotImplementedError):
                if handle is not None:
                    handle.unmerge()
                else:
                    method.unmerge(model, adapter_name)


# ---- the base model ---------------------------------------------------------------



def available_memory() -> int:
    """Bytes of memory available to a new allocation: Linux's MemAvailable (free plus reclaimable cache),
    else the free pages, else a fixed 8 GiB where neither can be read (macOS, Windows)."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def float64_room(model: nn.Module) -> str | None:
    """Why a float64 copy of ``model`` should not be made (None: it fits in half the available memory)."""
    need = 8 * sum(p.numel() for p in model.parameters())
    free = available_memory()
    if need > free // 2:
        return f"a float64 copy needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is available"
    return None


def vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if not isinstance(size, int) or size < 1:
        raise BaseModelError("the base model's config has no vocab_size", location="$.vocab_size",
                             hint="the ONNX export takes token ids: the base must be a text model", code="no_vocab")
    return size


def sample_inputs(model: nn.Module, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random token ids (any id of the vocabulary) and an all-ones attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size(model), (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


#: text for the verification inputs when the base folder has a tokenizer
CHECK_TEXTS = (
    "The capital of France is Paris. It lies on the Seine, and about two million people live in the city itself.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 7))  # prints 19\n",
    "Once upon a time there was a little girl who lived in a village near the forest with her grandmother.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.",
)


def text_inputs(base_dir: str | Path, model: nn.Module, batch: int, length: int) -> dict[str, torch.Tensor] | None:
    """``batch`` rows of ``length`` tokens of :data:`CHECK_TEXTS` (all-ones mask), or None without a tokenizer.

    Real text keeps the activations in the range the model was trained for: on random
    ids the float32 rounding of a 30-layer model alone reaches 1e-4 in the logits.
    """
    try:
        from transformers import AutoTokenizer

        from adapterkit.core.runtime.models import quiet_transformers

        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    except Exception:  # no tokenizer files, or one transformers cannot load: random ids instead
        return None
    size = vocab_size(model)
    try:
        texts = [list(tokenizer(text + " ", add_special_tokens=False)["input_ids"]) for text in CHECK_TEXTS]
    except Exception:  # a tokenizer without a vocabulary (transformers builds one from config.json alone)
        return None
    if min(len(ids) for ids in texts) < 8:
        return None
    rows = []
    for i in range(batch):
        ids: list[int] = []
        k = i
        while len(ids) < length:
            ids += texts[k % len(texts)]
            k += 1
        rows.append(ids[:length])
    tensor = torch.tensor(rows, dtype=torch.long)
    if int(tensor.min()) < 0 or int(tensor.max()) >= size:
        return None
    return {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}


# ---- swappable: factors as inputs -----------------------------------------------------

@dataclass
class FactorSlot:
    """The factors of the current forward call, by module path; hooks read them."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def install_factor_hooks(model: nn.Module, modules: Sequence[str], slot: FactorSlot) -> list[Any]:
    """Make each module add ``(x @ A) @ B`` (the slot's factors) to its output; returns the hook handles.

    A forward hook keeps the module itself in place, so the base weights keep their names.
    """
    handles = []
    for path in modules:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is None:
            for handle in handles:
                handle.remove()
            raise BaseModelError(f"module {path} not found in the base model", location=path,
                                 hint="export with the base model the adapter was made for", code="missing_module")

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor,
                 path: str = path) -> torch.Tensor:
            factors = slot.factors.get(path)
            if factors is None:
                return output
            a, b = factors
            x = args[0] if args else next(iter(kwargs.values()))
            return output + ((x.to(a.dtype) @ a) @ b).to(output.dtype)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles


# ---- the traced module -------------------------------------------------------------------

class ExportWrapper(nn.Module):
    """``forward(input_ids, attention_mask, *factors) -> one output tensor`` (logits), for tracing."""

    def __init__(self, model: nn.Module, output: str, slot: FactorSlot | None = None,
                 factor_modules: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.output = output
        self.__dict__["slot"] = slot  # not a submodule
        self.factor_modules = list(factor_modules)
        params = inspect.signature(model.forward).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.extra = {"use_cache": False} if "use_cache" in params or takes_kwargs else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        if self.slot is not None:
            self.slot.factors = {path: (factors[2 * i], factors[2 * i + 1])
                                 for i, path in enumerate(self.factor_modules)}
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **self.extra)
        finally:
            if self.slot is not None:
                self.slot.factors = {}
        return getattr(out, self.output)


def output_name(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """(name, value) of the output the export keeps: ``logits``, else ``last_hidden_state``."""
    with torch.no_grad():
        wrapper = ExportWrapper(model, "")
        out = wrapper.model(**inputs, return_dict=True, **wrapper.extra)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return name, value
    raise UsageError(f"{type(model).__name__} returns neither logits nor last_hidden_state",
                     hint="export a model with a language-model or classification head", code="no_output")


# ---- running an exporter -------------------------------------------------------------------

@dataclass
class TraceSpec:
    """What to trace: example args, input names and dynamic dims (per input: axis -> dim name)."""

    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]
    output_dynamic: dict[str, dict[int, str]]


def run_exporter(wrapper: nn.Module, spec: TraceSpec, path: Path, exporter: str, opset: int) -> str:
    """Trace ``wrapper`` into the ONNX file ``path`` (weights may land beside it); returns the exporter used."""
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    failures = []
    for name in order:
        try:
            with torch.no_grad(), _quiet():
                (_torchscript if name == "torchscript" else _dynamo)(wrapper, spec, path, opset)
            return name
        except AdapterkitError:
            raise
        except Exception as exc:  # an exporter failure: try the next one, report all
            first_line = next(iter(str(exc).strip().splitlines()), "")
            failures.append(f"{name}: {type(exc).__name__}: {first_line}")
            for leftover in path.parent.iterdir():
                if leftover.is_file():
                    leftover.unlink()
    raise AdapterkitError("the model could not be exported to ONNX", found=failures,
                          hint="try --exporter dynamo or --exporter torchscript, or another --opset",
                          code="export_failed")


def _torchscript(wrapper: nn.Module, spec: TraceSpec, path: Path, opset: int) -> None:
    axes = {**spec.dynamic, **spec.output_dynamic}
    torch.onnx.export(wrapper, spec.args, str(path), dynamo=False, input_names=spec.input_names,
                      output_names=spec.output_names, dynamic_axes=axes, opset_version=opset,
                      do_constant_folding=True)


def _dynamo(wrapper: nn.Module, spec: TraceSpec, path: Path, opset: int) -> None:
    from torch.export import Dim

    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if name not in dims:
            dims[name] = Dim(name.replace(".", "_"), min=0)
        return dims[name]

    shapes = [{axis: dim(n) for axis, n in spec.dynamic.get(name, {}).items()} or None for name in spec.input_names]
    # forward(input_ids, attention_mask, *factors): the var-positional part is one nested tuple, when present
    dynamic_shapes = (shapes[0], shapes[1], tuple(shapes[2:])) if len(shapes) > 2 else (shapes[0], shapes[1])
    program = torch.onnx.export(wrapper, spec.args, dynamo=True, input_names=spec.input_names,
                                output_names=spec.output_names, dynamic_shapes=dynamic_shapes, opset_version=opset,
                                verbose=False)
    assert program is not None
    program.save(str(path), external_data=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter (warnings, progress lines on stdout); errors still raise."""
    import io
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def logits_numpy(model: nn.Module, inputs: Mapping[str, torch.Tensor], output: str) -> np.ndarray:
    """The model's ``output`` for ``inputs`` as numpy (no grad): float32, or float64 from a float64 model."""
    with torch.no_grad():
        wrapper = ExportWrapper(model, output)
        value = wrapper(inputs["input_ids"], inputs["attention_mask"])
        return (value if value.dtype == torch.float64 else value.float()).numpy()
