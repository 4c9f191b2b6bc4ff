"""The ``peft-ia3`` format: (IA)^3 adapters in Hugging Face PEFT's on-disk layout (PEFT 0.21).

A folder holds ``adapter_config.json`` (``peft_type: "IA3"``, ``target_modules``,
``feedforward_modules``, ``fan_in_fan_out``, ...) and ``adapter_model.safetensors``
(or ``adapter_model.bin``) with one tensor per adapted module::

    base_model.model.<module>.ia3_l     [out, 1]  ordinary module: the output is scaled
    base_model.model.<module>.ia3_l     [1, in]   feed-forward module: the input is scaled

(``peft/tuners/ia3/layer.py``: ``IA3Layer.update_layer``; the adapter name is
stripped from the key on save.) PEFT decides which modules are feed-forward by
``module_path.endswith(name)`` over ``feedforward_modules`` (a regular
expression when it is a string). The canonical tensor is the same vector,
1-d, byte for byte. PEFT records neither the base weights' full shapes nor
whether a module has a bias, so reading needs the base model (``--base``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from adapterkit import (
    Adapter, BaseModelError, Format, FormatError, LossyConversionError, Manifest, read_safetensors,
    read_safetensors_header, write_safetensors,
)

from .method import in_out

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.ia3_l")
TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "sequence-classification", "TOKEN_CLS": "token-classification",
         "SEQ_2_SEQ_LM": "seq2seq-lm", "FEATURE_EXTRACTION": "feature-extraction", "QUESTION_ANS": "question-answering"}
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
TASK_TYPES = {task: task_type for task_type, task in TASKS.items()}
DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}
_BASE_HINT = ("PEFT IA3 folders record neither the base weights' shapes nor their biases: pass the base model "
              "(--base <local model folder>, or base=<folder or torch model>)")


def folder_of(path: Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() and path.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME) else path


def weights_file(folder: Path) -> Path | None:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def peft_feedforward(rule: Any, module: str) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``."""
    if isinstance(rule, str):
        return re.fullmatch(rule, module) is not None
    return any(module.endswith(name) for name in rule or ())


class PeftIa3Format(Format):
    """Hugging Face PEFT (IA)^3 folders."""

    name = "peft-ia3"
    description = "Hugging Face PEFT folder with peft_type IA3 (adapter_config.json + adapter_model.safetensors/.bin)"
    read_options = ("base",)
    write_options = ("base",)

    def detect(self, path: Path) -> bool:
        try:
            folder = folder_of(path)
            if not (folder / CONFIG_NAME).is_file() or weights_file(folder) is None:
                return False
            config = json.loads((folder / CONFIG_NAME).read_text("utf-8"))
            return isinstance(config, dict) and config.get("peft_type") == "IA3"
        except Exception:
            return False

    def checks(self, path: Path) -> list[str]:
        return ["checksums (PEFT folders carry none)"]

    # ---- read -----------------------------------------------------------------
    def read(self, path: Path, **options: Any) -> Adapter:
        folder = folder_of(Path(path))
        config_path = folder / CONFIG_NAME
        try:
            config = json.loads(config_path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise FormatError(f"cannot read {CONFIG_NAME}: {exc}", file=str(config_path), code="bad_file") from None
        if not isinstance(config, dict) or config.get("peft_type") != "IA3":
            raise FormatError("is not a PEFT IA3 config", file=str(config_path), location="$.peft_type", expected="IA3",
                              found=config.get("peft_type") if isinstance(config, dict) else type(config).__name__,
                              code="unsupported")
        tensor_path = weights_file(folder)
        if tensor_path is None:
            raise FormatError(f"no {SAFETENSORS_NAME} or {BIN_NAME} beside {CONFIG_NAME}", file=str(folder),
                              code="missing_file")
        raw = _load_tensors(tensor_path)
        vectors, other = {}, []
        for key, value in raw.items():
            match = _KEY.fullmatch(key)
            (other.append(key) if match is None else vectors.__setitem__(match["module"], value))
        if other:
            raise LossyConversionError(
                f"the file holds {len(other)} tensors that are not (IA)^3 vectors; they would be lost",
                file=str(tensor_path), found=sorted(other)[:5],
                hint="modules_to_save (e.g. a classification head PEFT trained) has no place in an (IA)^3 adapter",
                code="unsupported")
        if not vectors:
            raise FormatError("the file holds no (IA)^3 vector (base_model.model.<module>.ia3_l)",
                              file=str(tensor_path), code="no_targets")
        if options.get("base") is None:
            raise FormatError("the base model is needed to read this adapter", file=str(folder), hint=_BASE_HINT,
                              code="needs_base")
        layout, base_info = _base_layout(options["base"])
        ff_rule = config.get("feedforward_modules") or []
        conv1d = bool(config.get("fan_in_fan_out", False))
        targets, tensors, dtypes = {}, {}, set()
        for module, value in sorted(vectors.items()):
            feedforward = peft_feedforward(ff_rule, module)
            if value.ndim != 2 or value.shape[0 if feedforward else 1] != 1:
                want = "[1, in] (feed-forward)" if feedforward else "[out, 1]"
                raise FormatError(f"(IA)^3 vector has shape {list(value.shape)}, PEFT stores {want}",
                                  file=str(tensor_path), location=f"{PREFIX}{module}.ia3_l", code="tensor_shape")
            found = layout.get(module)
            if found is None:
                raise BaseModelError("adapted module does not exist in the base model", location=module,
                                     hint="is this the right base model?", code="wrong_base")
            kind, shape, bias = found
            kind = kind or ("conv1d" if conv1d else "linear")
            fan_in, fan_out = in_out(kind, shape)
            size = fan_in if feedforward else fan_out
            if value.size != size:
                raise BaseModelError(f"(IA)^3 vector of {module} has {value.size} entries, the base module's "
                                     f"{'input' if feedforward else 'output'} has {size}", location=module,
                                     hint="is this the right base model?", code="wrong_base")
            targets[module] = {"kind": kind, "shape": list(shape), "feedforward": feedforward, "bias": bias}
            tensors[f"{module}.ia3.l"] = np.ascontiguousarray(value.reshape(-1))
            dtypes.add(str(value.dtype))
        if len(dtypes) != 1 or dtypes.copy().pop() not in DTYPE_NAMES:
            raise FormatError("the (IA)^3 vectors must share one float dtype", file=str(tensor_path),
                              found=sorted(dtypes), code="dtype")
        from adapterkit import targets_fingerprint

        target_rule = config.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in targets})
        manifest_config: dict[str, Any] = {
            "target_modules": target_rule if isinstance(target_rule, str) else sorted(set(target_rule)),
        }
        if ff_rule:
            manifest_config["feedforward_modules"] = ff_rule if isinstance(ff_rule, str) else sorted(set(ff_rule))
        base_model = {"fingerprint": targets_fingerprint(targets), **base_info}
        for field, key in (("name", "base_model_name_or_path"), ("revision", "revision")):
            if isinstance(config.get(key), str):
                base_model[field] = config[key]
        task_type = config.get("task_type")
        manifest = Manifest(
            method="ia3", config=manifest_config, targets=targets, dtype=DTYPE_NAMES[dtypes.pop()],
            base_model=base_model, task=TASKS.get(task_type) if isinstance(task_type, str) else None,
            provenance={"converted_from": {"format": self.name, "config": config}},
        )
        return Adapter(manifest, tensors, source=folder, source_format=self.name)

    # ---- write ----------------------------------------------------------------
    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        if adapter.method != "ia3":
            raise LossyConversionError(f"the peft-ia3 format holds (IA)^3 adapters, not {adapter.method}",
                                       file=str(path), found=adapter.method,
                                       hint="use the peft format for LoRA, prompt and prefix tuning", code="unsupported")
        targets = adapter.targets
        modules = sorted(targets)
        feedforward = sorted(m for m in modules if targets[m].get("feedforward"))
        wrong = [m for m in modules if peft_feedforward(feedforward, m) != bool(targets[m].get("feedforward"))]
        if wrong:
            raise LossyConversionError("PEFT's feed-forward rule (a path ending in a listed name) would misclassify "
                                       "modules", file=str(path), found=wrong[:5], code="unsupported")
        tensors = {}
        for module in modules:
            vector = np.asarray(adapter.tensors[f"{module}.ia3.l"])
            shape = (1, vector.size) if targets[module].get("feedforward") else (vector.size, 1)
            tensors[f"{PREFIX}{module}.ia3_l"] = vector.reshape(shape)
        manifest = adapter.manifest
        config = {
            "auto_mapping": None,
            "base_model_name_or_path": manifest.base_model.get("name"),
            "exclude_modules": None,
            "fan_in_fan_out": all(targets[m].get("kind") == "conv1d" for m in modules),
            "feedforward_modules": feedforward,
            "inference_mode": True,
            "init_ia3_weights": True,
            "modules_to_save": None,
            "peft_type": "IA3",
            "revision": manifest.base_model.get("revision"),
            "target_modules": modules,
            "task_type": _task_type(manifest.task),
        }
        path = Path(path)
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
        write_safetensors(path / SAFETENSORS_NAME, tensors, {"format": "pt"})


def _task_type(task: str | None) -> str | None:
    """PEFT's task_type for the manifest's task. None for the tasks whose PEFT model class puts the head in
    ``modules_to_save`` and then requires its weights in the file (SEQ_CLS, TOKEN_CLS, QUESTION_ANS): the head
    belongs to the base model here, and ``PeftModel.from_pretrained`` loads the folder as it is."""
    task_type = TASK_TYPES.get(task) if task else None
    return None if task_type in HEAD_TASKS else task_type


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.name == BIN_NAME:
            import torch  # only for the pickle format; weights_only refuses arbitrary objects

            state = torch.load(path, map_location="cpu", weights_only=True)
            return {k: (v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
                    for k, v in state.items()}
        return read_safetensors(path)[0]
    except Exception as exc:  # noqa: BLE001 - any failure to parse is bad input
        raise FormatError(f"cannot read the tensors: {type(exc).__name__}: {exc}", file=str(path),
                          code="bad_file") from None


def _base_layout(base: Any) -> tuple[dict[str, tuple[str | None, list[int], bool]], dict[str, Any]]:
    """module path -> (kind or None when unknown, stored weight shape, has a bias); and base_model fields."""
    if hasattr(base, "named_modules"):  # a live torch model
        from .layer import describe

        layout = {}
        for path, module in base.named_modules():
            found = describe(module)
            if found is not None:
                layout[path] = (found[0], found[1], getattr(module, "bias", None) is not None)
        config = getattr(base, "config", None)
        info = {"model_type": getattr(config, "model_type", None),
                "architecture": (getattr(config, "architectures", None) or [type(base).__name__])[0]}
        return layout, {k: v for k, v in info.items() if v}
    folder = Path(base)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseModelError("the base folder has no safetensors weights", file=str(folder), code="bad_base")
    shapes: dict[str, list[int]] = {}
    for file in files:
        for key, info in read_safetensors_header(file).tensors.items():
            shapes[key] = list(info.shape)
    layout = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) == 2:
            module = key[: -len(".weight")]
            entry = (None, shape, f"{module}.bias" in shapes)
            layout[module] = entry
            if "." in module:  # a checkpoint saved from the inner model lacks the head's prefix
                layout.setdefault(module.split(".", 1)[1], entry)
    info: dict[str, Any] = {}
    try:
        hf = json.loads((folder / "config.json").read_text("utf-8"))
        info = {"model_type": hf.get("model_type"), "architecture": (hf.get("architectures") or [None])[0]}
    except (OSError, ValueError, AttributeError):
        pass
    return layout, {k: v for k, v in info.items() if isinstance(v, str)}
