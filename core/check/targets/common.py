"""What every runtime's plan needs: the adapter's low-rank factors, the base, dry-run conversions.

Runtimes apply low-rank updates only, so the plans work on any :class:`~adapterkit.LowRank`
method's factors (``A``, ``B``, scale), never on a method's name. What a runtime reads is the
output of one of adapterkit's writers (PEFT for vLLM and SGLang, GGUF for llama.cpp, ...), or the
input itself when it already is that format: :meth:`Context.peft_config` and
:meth:`Context.dry_run` produce it in a throwaway folder, so every refusal of the writer is a
finding of the plan.

Torch-free.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.errors import AdapterkitError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.format.report import ValidationReport
from adapterkit.core.format.targeting import is_stacked
from adapterkit.core.plugin.capabilities import Factors, FromFactors, LowRank, can_merge
from adapterkit.core.plugin.registry import Registry

from .plan import APPLIED, UNKNOWN, UNSUPPORTED, Plan, PlanModule, Refusal


@dataclass
class Context:
    """One adapter checked for one runtime."""

    report: ValidationReport
    adapter: Adapter
    registry: Registry
    base: Path | None = None
    version: tuple[int, ...] | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.report.path

    @cached_property
    def base_info(self) -> Any:
        if self.base is None:
            return None
        from adapterkit.core.format.base_model import read_base_model

        try:
            return read_base_model(self.base)
        except AdapterkitError:
            return None  # check_base reported it

    @cached_property
    def index(self) -> Any:
        if self.base_info is None:
            return None
        from adapterkit.core.format.module_index import ModuleIndex

        return ModuleIndex.from_base(self.base_info)

    @cached_property
    def architecture(self) -> str | None:
        if self.base_info is not None and self.base_info.architecture:
            return self.base_info.architecture
        return self.adapter.manifest.base_model.get("architecture")

    @cached_property
    def method(self) -> Any:
        try:
            return self.registry.method(self.adapter.method)
        except AdapterkitError:
            return None

    @cached_property
    def factors(self) -> dict[str, Factors] | None:
        """Module -> low-rank factors, when the method gives them (:class:`~adapterkit.LowRank`)."""
        method = self.method
        if not isinstance(method, LowRank):
            return None
        config = method.resolve_config(self.adapter.config)
        return {name: (method.stacked_factors if name in self.stacked else method.lora_factors)(
                    name, target, config, self.adapter.module_tensors(name))
                for name, target in sorted(self.adapter.targets.items())}

    @cached_property
    def stacked(self) -> dict[str, Any]:
        """The stacked ``parameter`` targets (``[n, d1, d2]``: one low-rank pair per index of the first axis,
        the experts of a mixture-of-experts layer); their factors are ``A [n, r, in]``, ``B [n, out, r]``."""
        return {name: t for name, t in self.adapter.targets.items() if is_stacked(t)}

    def refuse_stacked(self, plan: Plan, what: str) -> bool:
        """Whether the adapter has stacked expert parameters, which this runtime cannot take (``what`` says why);
        then the plan refuses the adapter and those modules."""
        if not self.stacked:
            return False
        name = sorted(self.stacked)[0]
        plan.refusals.append(Refusal(f"{plan.label} {what} ({len(self.stacked)} stacked expert parameters)",
                                     "stacked_parameters", f"$.targets[{name!r}]", sorted(self.stacked),
                                     "merge the adapter into the base (adapterkit merge) and serve the merged model"))
        for item in plan.modules:
            if item.module in self.stacked:
                item.status, item.code, item.reason, item.reported = UNSUPPORTED, "stacked_parameters", what, False
        return True

    def rank(self, module: str) -> int | None:
        factors = self.factors
        found = factors[module] if factors is not None else None
        return int(found.a.shape[-2]) if found is not None else None

    def parameters(self, module: str) -> int:
        """The module's own tensors' parameter count (shared tensors left out)."""
        prefix = f"{module}.{self.adapter.method}."
        return sum(int(v.size) for k, v in self.adapter.tensors.items() if k.startswith(prefix))

    @cached_property
    def tied_head(self) -> bool:
        """Whether the base's head is tied to its input embeddings (no ``lm_head.weight`` of its own)."""
        info = self.base_info
        return info is not None and "lm_head.weight" not in info.weights \
            and info.config.get("tie_word_embeddings") is not False

    def resolves(self, module: str) -> bool | None:
        """Whether ``module`` is a module of the base (None without a base)."""
        return None if self.index is None else module in self.index

    def not_low_rank_reason(self, runtime: str) -> tuple[str, str]:
        """(reason, hint) for a method without low-rank factors."""
        method = self.method
        name = getattr(method, "name", self.adapter.method)
        hint = ("merge it into the base (adapterkit merge) and serve the merged model" if can_merge(method)
                else "apply it with adapterkit instead")
        return (f"{runtime} applies low-rank (LoRA) updates only; method {name!r} gives no low-rank factors",
                hint + (", or lower it to a LoRA: adapterkit to-lora" if can_merge(method) else ""))

    def refuse_without_factors(self, plan: Plan, runtime: str, hint: str | None = None) -> bool:
        """Whether the method gives no low-rank factors; then every module of ``plan`` is refused, with ``hint``
        (default: merge, or lower it to a LoRA)."""
        if self.factors is not None:
            return False
        reason, default = self.not_low_rank_reason(runtime)
        plan.refuse_all(reason, f"{plan.runtime.replace('.', '_')}_method")
        for item in plan.modules:
            item.hint = hint or default
        return True

    def note_release(self, plan: Plan, version: str, rules: str) -> None:
        """A ``--target-version`` other than ``version``, the one the rules were read from: "not checked"."""
        if self.version is not None and self.version != tuple(int(p) for p in version.split(".")):
            plan.notes.append(f"release {'.'.join(map(str, self.version))} (the rules are {rules}'s)")

    def modules(self, runtime_module: Any = None) -> list[PlanModule]:
        """One applied entry per adapter module; ``runtime_module(path)`` names it in the runtime."""
        out = []
        for module in sorted(self.adapter.targets):
            name = runtime_module(module) if runtime_module is not None else module
            out.append(PlanModule(module, name, APPLIED, self.parameters(module), rank=self.rank(module)))
        return out

    # ---- what the runtime reads ------------------------------------------------------------

    def peft_config(self) -> tuple[dict[str, Any] | None, AdapterkitError | None]:
        """The ``adapter_config.json`` a PEFT-reading runtime sees: the file's own for a PEFT LoRA folder,
        else what ``convert --to peft`` writes (an error when the PEFT writer refuses the adapter). The
        runtimes read ``peft_type`` LORA only: a method whose PEFT layout is another one (VeRA, AdaLoRA)
        is written as its exact plain factors (:attr:`lowered`) first."""
        if "peft" in self._cache:
            return self._cache["peft"]
        result: tuple[dict[str, Any] | None, AdapterkitError | None] = (None, None)
        own = False
        if self.report.format == "peft":
            path = Path(self.path)
            file = path / "adapter_config.json" if path.is_dir() else path.parent / "adapter_config.json"
            try:
                config = json.loads(file.read_text("utf-8"))
                result = (config if isinstance(config, dict) else None), None
            except (OSError, ValueError) as exc:
                result = None, AdapterkitError(f"cannot read {file.name}: {exc}", file=str(file), code="bad_json")
            own = result[0] is None or not _other_peft_type(result[0]) or self.lowered is None
        if not own:
            result = self._written("peft", "adapter_config.json")
        self._cache["peft"] = result
        return result

    def dry_run(self, fmt: str, **options: Any) -> AdapterkitError | None:
        """The refusal of ``fmt``'s writer for this adapter, or None when it writes it."""
        key = f"dry:{fmt}"
        if key not in self._cache:
            self._cache[key] = self._written(fmt, None, **options)[1]
        return self._cache[key]

    @cached_property
    def lowered(self) -> Adapter | None:
        """The adapter as plain low-rank factors (exact) of the first :class:`~adapterkit.FromFactors` method,
        when its own method gives factors but is not that method (a writer may hold only the plain one)."""
        method = self.method
        if not isinstance(method, LowRank) or isinstance(method, FromFactors) or self.factors is None:
            return None
        holder = next((m for m in self.registry.methods.values() if isinstance(m, FromFactors)), None)
        if holder is None:
            return None
        manifest = self.adapter.manifest
        config, targets, tensors = holder.from_factors(
            {name: (manifest.targets[name], f) for name, f in self.factors.items()})
        lowered = Manifest(method=holder.name, method_version=holder.version, config=config, targets=targets,
                           dtype="float32", base_model=dict(manifest.base_model), task=manifest.task)
        return Adapter(lowered, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})

    def lowered_for(self, fmt: str) -> bool:
        """Whether ``fmt``'s files are written from :attr:`lowered` (the method's own layout is not what the runtime reads)."""
        return bool(self._cache.get(f"lowered:{fmt}"))

    def steps(self, fmt: str, command: str) -> list[str]:
        """The commands that make ``fmt``'s files: ``command``, after lowering to plain factors when needed."""
        if self._cache.get(f"lowered:{fmt}"):
            base = f" --base {self.base}" if isinstance(self.base, (str, Path)) else ""
            return [f"adapterkit compose {self.path} -o LORA --strategy cat{base} (exact: plain low-rank factors)",
                    command.replace(self.path, "LORA", 1)]
        return [command]

    def _written(self, fmt: str, read_back: str | None, **options: Any) -> tuple[dict[str, Any] | None,
                                                                                  AdapterkitError | None]:
        try:
            writer = self.registry.format(fmt)
        except AdapterkitError as exc:
            return None, exc
        declared = writer.write_options
        if self.base is not None and (declared is None or "base" in declared):
            options.setdefault("base", self.base)
        with tempfile.TemporaryDirectory(prefix="adapterkit-target-") as tmp:
            out = Path(tmp) / "out"
            try:
                writer.write(self.adapter, out, registry=self.registry, **options)
            except AdapterkitError as exc:  # LossyConversionError, FormatError, ...: what the writer refuses
                lowered = self.lowered
                if lowered is None:
                    exc.file = exc.file if exc.file and tmp not in exc.file else self.path
                    return None, exc
                shutil.rmtree(out, ignore_errors=True)
                try:
                    writer.write(lowered, out, registry=self.registry, **options)
                except AdapterkitError as again:
                    again.file = again.file if again.file and tmp not in again.file else self.path
                    return None, again
                self._cache[f"lowered:{fmt}"] = True
            else:
                written = out / "adapter_config.json"
                if fmt == "peft" and self.lowered is not None and written.is_file() and _other_peft_type(
                        json.loads(written.read_text("utf-8"))):
                    shutil.rmtree(out, ignore_errors=True)  # the runtimes read LoRA: its exact plain factors
                    try:
                        writer.write(self.lowered, out, registry=self.registry, **options)
                    except AdapterkitError as again:
                        again.file = again.file if again.file and tmp not in again.file else self.path
                        return None, again
                    self._cache[f"lowered:{fmt}"] = True
            if read_back is None:
                return None, None
            try:
                data = json.loads((out / read_back).read_text("utf-8"))
            except (OSError, ValueError) as exc:
                return None, AdapterkitError(f"the {fmt} writer's {read_back} cannot be read back: {exc}",
                                             code="bad_json")
            return (data if isinstance(data, dict) else None), None


def _other_peft_type(config: Any) -> bool:
    """Whether a PEFT config is of a layout other than LoRA (the only one the serving runtimes read)."""
    return isinstance(config, dict) and str(config.get("peft_type") or "LORA").upper() != "LORA"


def writer_refusal(plan: Plan, problem: AdapterkitError, fmt: str) -> None:
    """A writer that refuses the adapter writes no file: the runtime gets nothing. The module the writer
    names gets its message; a refusal already explained by the plan's own rules is not repeated."""
    module = (problem.location or "").removesuffix(".weight")
    named = next((item for item in plan.modules if item.module == module), None)
    if named is not None and named.status == UNSUPPORTED:
        return
    code = f"{plan.runtime.replace('.', '_')}_{problem.code}"
    plan.refusals.append(Refusal(f"adapterkit's {fmt} writer refuses the adapter: {problem.message}", code,
                                 problem.location, problem.found, problem.hint))
    plan.refuse_all(f"not written: the {fmt} writer refuses the adapter ({problem.message})", code, reported=False)
    if named is not None:
        named.reason = problem.message


def leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def sibling(module: str, name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``model.layers.0.self_attn.<name>``."""
    head, _, _ = module.rpartition(".")
    return f"{head}.{name}" if head else name


def unknown_architecture(plan: Plan, architecture: str | None, what: str) -> None:
    """Mark every applied module unknown: the runtime's table for this architecture is not known here."""
    for item in plan.modules:
        if item.status == APPLIED:
            item.status, item.reason = UNKNOWN, f"{what} for {architecture or 'an unknown architecture'} is not known here"
    plan.notes.append(f"which modules it adapts for {architecture or 'an unknown architecture'} (no table here)")


def scale_of(config: dict[str, Any]) -> float | None:
    """The one scale ``lora_alpha / r`` (or ``/ sqrt(r)``) of a PEFT config, None when it cannot be read."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    return float(alpha) / (float(r) ** 0.5 if config.get("use_rslora") else float(r))


def same_scale(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-30)
