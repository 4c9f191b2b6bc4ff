"""BOFT as an adapterkit :class:`~adapterkit.Method` (Liu et al. 2024, "Parameter-Efficient Orthogonal
Finetuning via Butterfly Factorization", ICLR 2024).

Per adapted linear / Conv1D module with ``in`` inputs and ``out`` outputs, split the inputs into
``block_num`` blocks of ``block_size`` (``block_num * block_size == in``) and take
``N = n_butterfly_factor`` butterfly factors:

- ``R [N, block_num, block_size, block_size]``: each block's skew-symmetric part
  ``S = (R - R^T) / 2`` gives an orthogonal block by the Cayley transform ``Q = (I - S)(I + S)^-1``;
- factor ``i`` is the block-diagonal ``B_i = diag(Q[i, 0], ..., Q[i, block_num - 1])`` conjugated by
  a butterfly permutation ``P_i`` of the inputs: ``M_i = P_i B_i P_i^T`` (``P_0`` and every ``P_i`` of a
  one-factor adapter are the identity, so ``N == 1`` is block-diagonal OFT);
- the rotation is ``M = M_{N-1} ... M_1 M_0`` ``[in, in]`` and the module computes
  ``y = s * (W M^T x) + b``: the merged weight is ``diag(s) W M^T``, the bias is left alone;
- ``s [out, 1]`` scales each output (the magnitude).

Canonical tensors per target ``m``: ``m.boft.R`` and ``m.boft.s``, PEFT's ``boft_R`` and
``boft_s`` byte for byte. Each target records ``block_size``, ``block_num`` and
``n_butterfly_factor``. This is ``peft/tuners/boft/layer.py`` of PEFT 0.21.2 (``BOFTLayer.update_layer``,
``block_butterfly_perm``, ``cayley_batch``, ``Linear.get_delta_weight`` / ``merge`` / ``forward``);
the code here is written anew. This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from adapterkit import (
    BaseModelError, MergedWeight, Method, TensorFileError, UsageError, WeightAdapterMethod, check_layers,
    check_selection, in_out_features, is_int,
)

KINDS = ("linear", "conv1d")
PARAMS = ("R", "s")
FIELDS = ("block_size", "block_num", "n_butterfly_factor")

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "uniqueItems": True}
_SELECTION = {"oneOf": [_NAMES, {"type": "string", "minLength": 1}]}
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "target_modules": {
            **_SELECTION,
            "description": "Modules to adapt: a list of names (a module matches its full path or a path ending in "
                           "'.<name>'), a regular expression matched against the whole path, or 'all-linear'.",
        },
        "exclude_modules": {
            "oneOf": [_NAMES, {"type": "string", "minLength": 1}, {"type": "null"}],
            "description": "Modules left out of target_modules' selection (same matching rules).",
        },
        "layers_to_transform": {
            "oneOf": [{"type": "integer", "minimum": 0},
                      {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                      {"type": "null"}],
            "description": "Only the modules of these layer (block) indices.",
        },
        "layers_pattern": {
            "oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                      {"type": "null"}],
            "description": "The name of the layer list layers_to_transform indexes (PEFT's layers_pattern).",
        },
        "boft_block_size": {"type": "integer", "minimum": 0,
                            "description": "Size of each orthogonal block (0: derived from boft_block_num); "
                                           "exactly one of boft_block_size and boft_block_num is non-zero "
                                           "(default 4, or 0 when boft_block_num is given)."},
        "boft_block_num": {"type": "integer", "minimum": 0,
                           "description": "Number of blocks per module (0: derived from boft_block_size)."},
        "boft_n_butterfly_factor": {"type": "integer", "minimum": 1,
                                    "description": "Number of butterfly factors (1: block-diagonal OFT)."},
        "boft_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1,
                         "description": "Multiplicative dropout in training: this fraction of one factor's blocks "
                                        "is replaced by the identity."},
        "init_weights": {"type": "boolean",
                         "description": "true: R = 0 and s = 1 (the identity); false: R ~ N(0, 0.1), s ~ N(1, 0.1)."},
    },
    "required": ["target_modules"],
}
DEFAULTS: dict[str, Any] = {
    "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "boft_block_size": 4, "boft_block_num": 0,
    "boft_n_butterfly_factor": 1, "boft_dropout": 0.0, "init_weights": True,
}
_POSITIVE = {"type": "integer", "minimum": 1}
TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"enum": list(KINDS)},
        "shape": {"type": "array", "items": _POSITIVE, "minItems": 2, "maxItems": 2},
        "block_size": {**_POSITIVE, "description": "size of each orthogonal block"},
        "block_num": {**_POSITIVE, "description": "blocks per factor (block_size * block_num == in)"},
        "n_butterfly_factor": {**_POSITIVE, "description": "number of butterfly factors (R's first axis)"},
    },
    "required": list(FIELDS),
}


# ---- the rules of PEFT's BOFTLayer.update_layer -------------------------------------------

def block_problem(in_features: int, block_size: int, block_num: int, n_factors: int) -> tuple[str, str] | None:
    """``(field, message)`` when PEFT refuses these blocks for a module of ``in_features`` inputs, else None
    (``BOFTLayer.update_layer``'s checks, with ``n_factors`` the number of factors, PEFT's ``n + 1``)."""
    extra = n_factors - 1
    if n_factors < 1:
        return "boft_n_butterfly_factor", f"boft_n_butterfly_factor must be >= 1, not {n_factors}"
    if block_size < 1 or block_num < 1 or block_size * block_num != in_features:
        return "boft_block_size", (f"{block_num} blocks of {block_size} do not make the module's {in_features} "
                                   "inputs")
    if extra:
        if extra > int(math.log2(block_num)) or block_num % (2 ** extra):
            return "boft_n_butterfly_factor", (f"{n_factors} butterfly factors need the number of blocks "
                                               f"({block_num}) to be a multiple of {2 ** extra}")
        if block_num % 2 or block_size % 2:
            return "boft_block_size", (f"with {n_factors} butterfly factors the block size ({block_size}) and "
                                       f"number ({block_num}) must be even")
    return None


def resolve_blocks(in_features: int, block_size: int, block_num: int, n_factors: int) -> tuple[int, int]:
    """``(block_size, block_num)`` of a module from the config's (one of them 0), as PEFT derives them;
    raises ``ValueError((field, message))`` where PEFT refuses."""
    if (block_size == 0) == (block_num == 0):
        raise ValueError(("boft_block_size", "exactly one of boft_block_size and boft_block_num must be non-zero"))
    given, field = (block_num, "boft_block_num") if block_size == 0 else (block_size, "boft_block_size")
    if in_features % given:
        raise ValueError((field, f"{field.removeprefix('boft_')} {given} does not divide the module's "
                                 f"{in_features} inputs"))
    if block_size == 0:
        block_size = in_features // block_num
    else:
        block_num = in_features // block_size
    problem = block_problem(in_features, block_size, block_num, n_factors)
    if problem:
        raise ValueError(problem)
    return block_size, block_num


@lru_cache(maxsize=256)
def butterfly_perms(in_features: int, block_size: int, block_num: int, n_factors: int) -> tuple[tuple[int, ...], ...]:
    """The input permutation of each factor, as PEFT's ``block_butterfly_perm`` gives it (``P_i[j, perm[j]] = 1``).

    Factor ``i`` of a multi-factor adapter cuts the inputs into chunks of ``block_size * 2**i`` and each chunk
    into half blocks (``block_size / 2``), then puts the even half blocks first and the odd ones after; a
    one-factor adapter's permutation is the identity.
    """
    perms = []
    for i in range(n_factors):
        indices = list(range(in_features))
        if n_factors > 1:
            half = block_size // 2
            chunk = in_features // (block_num // 2 ** i)
            parts = chunk // half
            order = [*range(0, parts, 2), *range(1, parts, 2)]
            for start in range(0, in_features, chunk):
                indices[start:start + chunk] = [start + part * half + j for part in order for j in range(half)]
        perms.append(tuple(indices))
    return tuple(perms)


def cayley(r: np.ndarray) -> np.ndarray:
    """Orthogonal blocks ``(I - S)(I + S)^-1`` of the skew-symmetric parts ``S = (R - R^T) / 2`` (float64)
    (PEFT's ``cayley_batch``)."""
    r = np.asarray(r, dtype=np.float64)
    skew = 0.5 * (r - np.swapaxes(r, -1, -2))
    eye = np.broadcast_to(np.eye(r.shape[-1]), r.shape)
    # Q (I + S) = I - S  <=>  (I + S)^T Q^T = (I - S)^T
    return np.swapaxes(np.linalg.solve(np.swapaxes(eye + skew, -1, -2), np.swapaxes(eye - skew, -1, -2)), -1, -2)


def rotate(weight: np.ndarray, q: np.ndarray, perms: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """``W M^T`` for ``W [out, in]`` (float64): ``W P_i B_i^T P_i^T`` applied for ``i = 0 .. N-1``."""
    out, fan_in = weight.shape
    n_factors, block_num, block_size, _ = q.shape
    for i in range(n_factors):
        perm = np.asarray(perms[i])
        inverse = np.argsort(perm)
        y = weight[:, inverse].reshape(out, block_num, block_size)
        z = np.einsum("odb,dab->oda", y, q[i]).reshape(out, fan_in)
        weight = z[:, perm]
    return weight


class BoftMethod(WeightAdapterMethod, Method, MergedWeight):
    """BOFT: a butterfly product of block-diagonal orthogonal rotations of each module's inputs, and an
    output scale (mergeable; the rotation needs the base weight, so merging and to-lora take the base)."""

    name = "boft"
    version = "1"
    description = ("BOFT: butterfly-factorised orthogonal rotation of linear / Conv1D weights (Cayley blocks) "
                   "and an output scale (mergeable)")

    # ---- torch-free -----------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        given = dict(config)
        if given.get("boft_block_num") and "boft_block_size" not in given:
            given["boft_block_size"] = 0  # a number of blocks alone: the size follows from it
        config = {**DEFAULTS, **given}
        unknown = sorted(set(config) - set(CONFIG_SCHEMA["properties"]))
        if unknown:
            raise UsageError(f"unknown boft option {unknown[0]!r}", location=f"$.method.config.{unknown[0]}",
                             expected=sorted(CONFIG_SCHEMA["properties"]), hint="check the spelling", code="bad_option")
        config["target_modules"] = check_selection("target_modules", config["target_modules"])
        config["exclude_modules"] = check_selection("exclude_modules", config.get("exclude_modules"), nullable=True)
        config["layers_to_transform"], config["layers_pattern"] = check_layers(config["layers_to_transform"],
                                                                               config["layers_pattern"])
        for key, low in (("boft_block_size", 0), ("boft_block_num", 0), ("boft_n_butterfly_factor", 1)):
            if not (is_int(config[key]) and config[key] >= low):
                raise _bad(key, f"{key} must be an integer >= {low}", config[key])
            config[key] = int(config[key])
        if (config["boft_block_size"] == 0) == (config["boft_block_num"] == 0):
            raise _bad("boft_block_size", "exactly one of boft_block_size and boft_block_num must be non-zero "
                       "(block_size * block_num == in_features)",
                       {"boft_block_size": config["boft_block_size"], "boft_block_num": config["boft_block_num"]},
                       "e.g. boft_block_size=4 with boft_block_num=0")
        dropout = config["boft_dropout"]
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
            raise _bad("boft_dropout", "boft_dropout must be a number in [0, 1)", dropout)
        if not isinstance(config["init_weights"], bool):
            raise _bad("init_weights", "init_weights must be true or false", config["init_weights"])
        return config

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def target_fields(self, module: str, kind: str, shape: list[int], config: Mapping[str, Any]) -> dict[str, Any]:
        """The blocks of a new target from the config, by PEFT's rules for the module's input size."""
        fan_in, _ = in_out_features(kind, shape)
        n_factors = int(config["boft_n_butterfly_factor"])
        try:
            size, num = resolve_blocks(fan_in, int(config["boft_block_size"]), int(config["boft_block_num"]), n_factors)
        except ValueError as exc:
            field, message = exc.args[0]
            raise UsageError(f"{module}: {message}", location=f"$.method.config.{field}", found=config.get(field),
                             hint="choose a block size (or number) that divides every adapted module's inputs "
                                  "(and, with butterfly factors, block_num a multiple of 2**(factors - 1))",
                             code="bad_option") from None
        return {"block_size": size, "block_num": num, "n_butterfly_factor": n_factors}

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        _, fan_out = in_out_features(target.get("kind", "linear"), target["shape"])
        n, num, size = (int(target[k]) for k in ("n_butterfly_factor", "block_num", "block_size"))
        return {f"{module}.{self.name}.R": (n, num, size, size), f"{module}.{self.name}.s": (fan_out, 1)}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        if target.get("kind") not in KINDS:
            problems.append(f"kind {target.get('kind')!r} is not one BOFT adapts; expected one of {list(KINDS)}")
        shape = target.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(d) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not a 2-d weight shape [d0, d1]")
            return problems
        if not all(is_int(target.get(k)) and target[k] > 0 for k in FIELDS):
            problems.append(f"{', '.join(FIELDS)} must be integers >= 1")
            return problems
        fan_in, _ = in_out_features(target.get("kind", "linear"), shape)
        problem = block_problem(fan_in, target["block_size"], target["block_num"], target["n_butterfly_factor"])
        if problem:
            problems.append(problem[1])
            return problems
        try:  # the config must give the module the blocks it records (PEFT's config holds them)
            want = self.target_fields(module, target["kind"], shape, self.resolve_config(config))
        except UsageError as exc:
            return [*problems, str(exc)]
        if any(want[k] != target[k] for k in FIELDS):
            problems.append(f"the config gives the module {', '.join(f'{k} {want[k]}' for k in FIELDS)}; the target "
                            f"records {', '.join(f'{k} {target[k]}' for k in FIELDS)}")
        return problems

    def merged_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                      tensors: Mapping[str, np.ndarray], weight: np.ndarray) -> np.ndarray:
        """``diag(s) W M^T`` in the stored orientation (transposed for Conv1D), in ``weight``'s dtype
        (computed in float64): PEFT's ``Linear.merge``."""
        base = np.asarray(weight)
        if list(base.shape) != [int(d) for d in target["shape"]]:
            raise BaseModelError(f"{module}: base weight {list(base.shape)} is not the adapter's {list(target['shape'])}",
                                 location=module, code="shape_mismatch")
        r, s = (self._tensor(module, tensors, p) for p in PARAMS)
        conv1d = target.get("kind") == "conv1d"
        linear = (base.T if conv1d else base).astype(np.float64)
        n, num, size = (int(target[k]) for k in ("n_butterfly_factor", "block_num", "block_size"))
        if r.shape != (n, num, size, size) or s.shape != (linear.shape[0], 1):
            raise TensorFileError(f"{module}: BOFT tensors R {list(r.shape)} / s {list(s.shape)} do not fit the target",
                                  location=module, code="tensor_shape")
        rotated = rotate(linear, cayley(r), butterfly_perms(linear.shape[1], size, num, n))
        merged = rotated * np.asarray(s, dtype=np.float64)
        return np.ascontiguousarray(merged.T if conv1d else merged).astype(base.dtype if base.dtype.kind == "f"
                                                                            else np.float32)

    def _tensor(self, module: str, tensors: Mapping[str, np.ndarray], param: str) -> np.ndarray:
        value = tensors.get(param, tensors.get(f"{module}.{self.name}.{param}"))
        if value is None:
            raise TensorFileError(f"BOFT tensor {param} of {module} is missing", location=module,
                                  expected=[f"{module}.{self.name}.{param}"], found=sorted(tensors), code="missing_tensor")
        return np.asarray(value)

    # ---- torch (adapterkit_boft.layer imports torch) ----------------------------
    @property
    def layer_class(self) -> Any:
        from .layer import BoftLayer

        return BoftLayer

    def new_parameters(self, layer: Any, config: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
        from .layer import new_parameters

        return new_parameters(layer, config, target)

    def new_dropout(self, config: Mapping[str, Any], target: Mapping[str, Any]) -> Any:
        if not config.get("boft_dropout"):
            return None
        from .layer import MultiplicativeDropout

        return MultiplicativeDropout(float(config["boft_dropout"]))


def _bad(field: str, message: str, found: Any, hint: str | None = None) -> UsageError:
    return UsageError(message, location=f"$.method.config.{field}", found=found,
                      hint=hint or f"fix {field} in the boft config", code="bad_option")
