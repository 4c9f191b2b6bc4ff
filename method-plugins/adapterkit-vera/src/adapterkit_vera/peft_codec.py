"""The PEFT ``VERA`` codec: VeRA adapters inside adapterkit's ``peft`` format (PEFT 0.21's layout).

The ``peft`` format owns the folder; this codec says what ``peft_type: "VERA"`` means, through the
context the format hands it (docs/plugins.md, "The PEFT codec context"). Public ``adapterkit`` API only.

PEFT's file (``VeraModel._get_adapter_state_dict``; the adapter name stripped on save)::

    base_model.model.<module>.vera_lambda_b   [out]   -> <module>.vera.lambda_b
    base_model.model.<module>.vera_lambda_d   [r]     -> <module>.vera.lambda_d
    base_model.vera_A                         [r, max_in]    -> vera.A   (only with save_projection)
    base_model.vera_B                         [max_out, r]   -> vera.B   (only with save_projection)

With ``save_projection: false`` PEFT keeps no projections and redraws them from
``projection_prng_key`` on load (``VeraModel._init_vera_A_vera_B``, sized by ``_find_dim`` over the
adapted modules); this codec redraws them the same way, bit for bit (it needs torch for that), and writes
``save_projection: false`` again only when the adapter's projections are exactly the redrawn ones.

PEFT records no base weight shapes (a module's input size is in no tensor), so reading needs the
base model (``--base``). ``bias`` other than ``"none"`` and ``modules_to_save`` (weights a VeRA
adapter cannot hold) are refused, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    Adapter, BaseModelError, Codec, FormatError, LossyConversionError, check_tensor_dims, in_out_features, is_int,
   
)

from .method import ALL_LINEAR, DEFAULTS, KINDS, LAMBDA_B, LAMBDA_D, SHARED_A, SHARED_B, projection_shapes

LEAVES = {"vera_lambda_b": LAMBDA_B, "vera_lambda_d": LAMBDA_D}
#: every field of PEFT 0.21.2's VeraConfig besides PeftConfig's
KNOWN_FIELDS = frozenset({"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                          "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform",
                          "layers_pattern"})
KEY_A, KEY_B = "base_model.vera_A", "base_model.vera_B"
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
_BASE_HINT = ("PEFT VERA folders do not record the adapted modules' input sizes: pass the base model "
              "(--base <local model folder>, or base=<folder or torch model>)")
_FIX = "fix the value in adapter_config.json (PEFT itself could not load it)"


def _bad(message: str, file: str, field: str, found: Any, hint: str = _FIX) -> FormatError:
    return FormatError(message, file=file, location=f"$.{field}", found=found, hint=hint, code="bad_config")


def redrawn_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[np.ndarray, np.ndarray]:
    """The projections PEFT draws from ``projection_prng_key`` (float32 numpy); needs torch."""
    try:
        from .layer import projections
    except ImportError as exc:  # pragma: no cover - torch is a dependency of every test setup
        raise FormatError("redrawing VeRA's projections from projection_prng_key needs torch", found=str(exc),
                          hint="install torch, or use a folder saved with save_projection: true",
                          code="needs_torch") from None
    shared_a, shared_b = projections(r, max_in, max_out, key)
    return shared_a.numpy(), shared_b.numpy()


class VeraPeftCodec(Codec):
    """PEFT's VERA layout for the ``vera`` method."""

    format = "peft"
    key = "VERA"
    methods = ("vera",)
    description = "PEFT VeRA (reading needs the base model)"

    # ---- read -----------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        config, config_file, file = context.config, context.config_file, context.tensors_file
        context.refuse_unknown_fields(KNOWN_FIELDS, "vera")
        fields = _check_config(config, config_file)
        raw = context.tensors
        check_tensor_dims(raw, file)
        vectors: dict[str, dict[str, np.ndarray]] = {}
        other = []
        for key, value in raw.items():
            if key in (KEY_A, KEY_B):
                continue
            for leaf, param in LEAVES.items():
                module = context.module_of(key, leaf)
                if module is not None:
                    vectors.setdefault(module, {})[param] = value
                    break
            else:
                other.append(key)
        if other:
            raise LossyConversionError(
                f"the file holds {len(other)} tensors that are not VeRA's; they would be lost", file=file,
                found=sorted(other)[:5], hint="modules_to_save or trained biases have no place in a VeRA adapter",
                code="unsupported")
        if not vectors:
            raise FormatError(f"the file holds no VeRA vectors ({context.key('<module>', 'vera_lambda_b')})",
                              file=file, code="no_targets")
        for module, pair in sorted(vectors.items()):
            for leaf, param in LEAVES.items():
                if param not in pair:
                    raise FormatError(f"module {module} has no {leaf}", file=file, location=context.key(module, leaf),
                                      code="missing_tensor")
        if context.base is None:
            raise FormatError("the base model is needed to read this adapter", file=str(context.folder),
                              hint=_BASE_HINT, code="needs_base")
        r = fields["r"]
        conv1d = bool(config.get("fan_in_fan_out", False))
        targets: dict[str, dict[str, Any]] = {}
        tensors: dict[str, np.ndarray] = {}
        dtypes = set()
        for module, pair in sorted(vectors.items()):
            kind, shape, _ = context.base_module(module, KINDS)
            target = {"kind": kind or ("conv1d" if conv1d else "linear"), "shape": list(shape)}
            _, fan_out = in_out_features(target["kind"], target["shape"])
            lambda_d, lambda_b = pair[LAMBDA_D], pair[LAMBDA_B]
            if lambda_d.shape != (r,):
                raise FormatError(f"vera_lambda_d has shape {list(lambda_d.shape)}; r = {r} wants [{r}]", file=file,
                                  location=context.key(module, "vera_lambda_d"), code="tensor_shape")
            if lambda_b.shape != (fan_out,):
                raise BaseModelError(f"vera_lambda_b of {module} has shape {list(lambda_b.shape)}; the base module "
                                     f"has {fan_out} outputs", location=module, hint="is this the right base model?",
                                     code="wrong_base")
            targets[module] = target
            tensors[f"{module}.vera.{LAMBDA_D}"] = lambda_d
            tensors[f"{module}.vera.{LAMBDA_B}"] = lambda_b
            dtypes.update((str(lambda_d.dtype), str(lambda_b.dtype)))
        warnings: list[str] = []
        shape_a, shape_b = projection_shapes(targets, r)
        stored = KEY_A in raw or KEY_B in raw
        if fields["save_projection"]:
            if not (KEY_A in raw and KEY_B in raw):
                raise FormatError("save_projection is true but the file lacks base_model.vera_A / vera_B", file=file,
                                  location=KEY_B if KEY_A in raw else KEY_A,
                                  hint="PEFT could not load this folder either", code="missing_tensor")
            shared_a, shared_b = raw[KEY_A], raw[KEY_B]
            if (shared_a.ndim != 2 or shared_b.ndim != 2 or shared_a.shape[0] != r or shared_b.shape[1] != r
                    or shared_a.shape[1] < shape_a[1] or shared_b.shape[0] < shape_b[0]):
                raise FormatError("the projections do not fit the adapted modules", file=file, location=KEY_A,
                                  expected={"vera_A": list(shape_a), "vera_B": list(shape_b)},
                                  found={"vera_A": list(shared_a.shape), "vera_B": list(shared_b.shape)},
                                  code="tensor_shape")
            if tuple(shared_a.shape) != shape_a or tuple(shared_b.shape) != shape_b:
                warnings.append(f"the projections {list(shared_a.shape)} / {list(shared_b.shape)} are larger than the "
                                f"adapted modules use; kept the used slices {list(shape_a)} / {list(shape_b)}")
                shared_a = np.ascontiguousarray(shared_a[:, : shape_a[1]])
                shared_b = np.ascontiguousarray(shared_b[: shape_b[0], :])
        else:
            shared_a, shared_b = redrawn_projections(r, shape_a[1], shape_b[0], fields["projection_prng_key"])
            if stored:
                warnings.append("save_projection is false: PEFT ignores the file's vera_A / vera_B and redraws them "
                                "from projection_prng_key; so did adapterkit")
        dtypes.update((str(shared_a.dtype), str(shared_b.dtype)))
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
            raise LossyConversionError("VeRA's vectors and projections must share one float dtype here", file=file,
                                       found=sorted(dtypes), hint="cast the adapter to one dtype in PEFT and save it "
                                       "again", code="dtype")
        tensors[f"vera.{SHARED_A}"] = shared_a
        tensors[f"vera.{SHARED_B}"] = shared_b
        method_config = _method_config(config, fields, targets)
        return context.adapter("vera", method_config, targets, tensors, dtypes.pop(), base_model=context.base_fields(),
                               warnings=warnings)

    # ---- write ----------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        expected = {f"{m}.vera.{p}" for m in adapter.targets for p in (LAMBDA_D, LAMBDA_B)}
        expected |= {f"vera.{SHARED_A}", f"vera.{SHARED_B}"}
        missing = sorted(expected - set(adapter.tensors))
        if missing:
            return f"the tensor {missing[0]} is missing"
        extra = sorted(set(adapter.tensors) - expected)
        if extra:
            return f"the tensor {extra[0]} has no place in a PEFT VERA file and would be lost"
        other = sorted(m for m, t in adapter.targets.items() if t.get("kind") not in KINDS)
        if other:
            return f"{other[0]} is a {adapter.targets[other[0]].get('kind')!r} target; PEFT VeRA adapts {list(KINDS)}"
        config = {**DEFAULTS, **adapter.config}
        shape_a, shape_b = projection_shapes(adapter.targets, int(config["r"]))
        if (tuple(adapter.tensors[f"vera.{SHARED_A}"].shape) != shape_a
                or tuple(adapter.tensors[f"vera.{SHARED_B}"].shape) != shape_b):
            return f"the projections are not {list(shape_a)} / {list(shape_b)}, the sizes PEFT gives them"
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        targets = adapter.targets
        modules = sorted(targets)
        config = {**DEFAULTS, **adapter.config}
        release = context.release
        shapes = {tuple(in_out_features(t.get("kind", "linear"), t["shape"])) for t in targets.values()}
        if release is not None and release.before("0.12.0") and len(shapes) > 1:
            raise release.refusal("targets", sorted(f"{i}->{o}" for i, o in shapes), "0.12.0",
                                  what="VeRA on modules of several shapes (its VeRA needs one shape for every target)")
        tensors: dict[str, np.ndarray] = {}
        for module in modules:
            tensors[context.key(module, "vera_lambda_b")] = np.asarray(adapter.tensors[f"{module}.vera.{LAMBDA_B}"])
            tensors[context.key(module, "vera_lambda_d")] = np.asarray(adapter.tensors[f"{module}.vera.{LAMBDA_D}"])
        shared_a, shared_b = adapter.tensors[f"vera.{SHARED_A}"], adapter.tensors[f"vera.{SHARED_B}"]
        save_projection = True
        if config["save_projection"] is False:
            # leave them out only when PEFT's redraw gives these very bits back
            try:
                redrawn_a, redrawn_b = redrawn_projections(int(config["r"]), shared_a.shape[1], shared_b.shape[0],
                                                           int(config["projection_prng_key"]))
            except FormatError:  # no torch here: store them, PEFT then needs no redraw
                redrawn_a = redrawn_b = np.zeros(0, dtype=np.float32)
            save_projection = not (shared_a.dtype == redrawn_a.dtype and shared_a.tobytes() == redrawn_a.tobytes()
                                   and shared_b.dtype == redrawn_b.dtype and shared_b.tobytes() == redrawn_b.tobytes())
        if save_projection:
            tensors[KEY_A], tensors[KEY_B] = np.asarray(shared_a), np.asarray(shared_b)
        wanted = config["target_modules"] if config["target_modules"] != ALL_LINEAR else None
        layers = config["layers_to_transform"] if isinstance(config["target_modules"], list) else None
        selection = context.selection(modules, wanted=wanted, layers=layers)
        if selection.pop("exclude_modules", None) not in (None, [], ""):
            selection = {"target_modules": sorted(modules), "layers_to_transform": None, "layers_pattern": None}
        fields = {
            **selection,
            "r": int(config["r"]),
            "projection_prng_key": int(config["projection_prng_key"]),
            "save_projection": save_projection,
            "vera_dropout": config["vera_dropout"],
            "d_initial": config["d_initial"],
            "fan_in_fan_out": all(targets[m].get("kind") == "conv1d" for m in modules),
            "bias": "none",
            "modules_to_save": None,
            "init_weights": config["init_weights"],
        }
        if "auto_mapping" not in context.original:
            fields["auto_mapping"] = None
        return fields, tensors


def _check_config(config: Mapping[str, Any], file: str) -> dict[str, Any]:
    """The VeRA fields of a PEFT config, checked; what a VeRA adapter cannot hold refused (one line, the field)."""
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise LossyConversionError(f"bias={bias!r}: PEFT trained the adapted modules' biases too; a VeRA adapter "
                                   "holds no biases and they would be lost", file=file, location="$.bias", found=bias,
                                   hint='only bias: "none" converts', code="unsupported")
    if config.get("modules_to_save"):
        raise LossyConversionError("modules_to_save: fully trained modules and their weights have no place in a VeRA "
                                   "adapter and would be lost", file=file, location="$.modules_to_save",
                                   found=config["modules_to_save"], code="unsupported")
    r = config.get("r", 256)
    if not (is_int(r) and r >= 1):
        raise _bad("r must be an integer >= 1", file, "r", r)
    key = config.get("projection_prng_key", 0)
    if not is_int(key) or not (-(2 ** 63) <= key <= 2 ** 64 - 1):
        raise _bad("projection_prng_key must be an integer", file, "projection_prng_key", key)
    save = config.get("save_projection", True)
    init = config.get("init_weights", True)
    for name, value in (("save_projection", save), ("init_weights", init), ("fan_in_fan_out",
                                                                              config.get("fan_in_fan_out", False))):
        if not isinstance(value, bool):
            raise _bad(f"{name} must be true or false", file, name, value)
    dropout = config.get("vera_dropout", 0.0)
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise _bad("vera_dropout must be a number in [0, 1)", file, "vera_dropout", dropout)
    d_initial = config.get("d_initial", 0.1)
    if not (isinstance(d_initial, (int, float)) and not isinstance(d_initial, bool) and np.isfinite(d_initial)):
        raise _bad("d_initial must be a finite number", file, "d_initial", d_initial)
    return {"r": r, "projection_prng_key": key, "save_projection": save, "init_weights": init,
            "vera_dropout": dropout, "d_initial": d_initial}


def _method_config(config: Mapping[str, Any], fields: Mapping[str, Any],
                   targets: Mapping[str, Any]) -> dict[str, Any]:
    """The ``vera`` method config of a PEFT config: its own fields, and the selection PEFT applied."""
    rule = config.get("target_modules")
    if isinstance(rule, str):
        target_modules: Any = rule
    elif isinstance(rule, list) and rule:
        target_modules = sorted(set(rule))
    else:
        target_modules = sorted({m.rsplit(".", 1)[-1] for m in targets})
    out: dict[str, Any] = {"target_modules": target_modules, **fields}
    layers = config.get("layers_to_transform")
    if isinstance(target_modules, list) and layers not in (None, []):
        out["layers_to_transform"] = [layers] if is_int(layers) else sorted(set(layers))
        if config.get("layers_pattern"):
            out["layers_pattern"] = config["layers_pattern"]
    return out
