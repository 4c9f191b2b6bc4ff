"""OFT as an adapterkit :class:`~adapterkit.Method` (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by
Orthogonal Finetuning"), with PEFT 0.21's parameterisation.

Each adapted linear / Conv1D module's input (``in`` features) is cut into ``r`` blocks of
``block_size`` (``r * block_size == in``). Each block ``i`` has a skew-symmetric matrix ``Q_i``
(``Q_i = U - U^T``, ``U`` strictly upper-triangular, stored row-major as a vector of
``block_size * (block_size - 1) / 2`` entries) turned into a rotation ``R_i``:

- Cayley (``use_cayley_neumann`` false): ``R_i = (I - Q_i)(I + Q_i)^-1`` (PEFT solves ``X (I + Q) = I - Q``);
- Cayley-Neumann (true, PEFT's default): ``R_i = I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)`` with
  ``n = num_cayley_neumann_terms`` (n <= 1: ``I``; n = 2: ``I + 2Q``; n = 3 or 4: ``I + 2Q + 2Q^2 + Q^3``),
  a truncation of ``(I + Q)(I - Q)^-1``: note the opposite sign of ``Q`` to the exact form, as in PEFT.

The module computes ``base(x @ blockdiag(R))``, i.e. the weight ``[out, in]`` becomes
``W @ blockdiag(R)^T`` (PEFT's ``OFTRotationModule.forward`` / ``Linear.merge``). ``block_share``:
one block of parameters serves every block. ``coft``: each block's ``Q`` is first scaled back
to Frobenius norm ``eps / sqrt(rows)`` when larger (``rows``: 1 or ``r``, PEFT's ``_project_batch``).

Canonical tensor per target ``m``: ``m.oft.R`` ``[r (1 with block_share), block_size * (block_size - 1) / 2]``,
PEFT's ``oft_R.weight`` byte for byte. The target records ``r`` and ``block_size``. This module
imports no torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    BaseModelError, MergedWeight, Method, TensorFileError, UsageError, WeightAdapterMethod, check_layers,
    check_selection, in_out_features,
)

KINDS = ("linear", "conv1d")
PARAM = "R"

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "uniqueItems": True}
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "target_modules": {
            "description": "Modules to adapt: a list of names (a module matches its full path or a path ending in "
                           "'.<name>'), a regular expression matched against the whole path, or 'all-linear'.",
            "oneOf": [_NAMES, {"type": "string", "minLength": 1}],
        },
        "exclude_modules": {
            "description": "Modules not to adapt (same matching rules); null for none.",
            "oneOf": [_NAMES, {"type": "string", "minLength": 1}, {"type": "null"}],
        },
        "layers_to_transform": {
            "description": "Adapt only these layer indices (null: all).",
            "oneOf": [{"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                      {"type": "null"}],
        },
        "layers_pattern": {
            "description": "The name of the module list holding the layers ('layers', 'h'); with layers_to_transform.",
            "oneOf": [{"type": "string", "minLength": 1}, {"type": "null"}],
        },
        "r": {"type": "integer", "minimum": 0,
              "description": "Number of blocks per module (0: derived from oft_block_size). Give r or oft_block_size."},
        "oft_block_size": {"type": "integer", "minimum": 0,
                           "description": "Block size (0: derived from r). PEFT adjusts a size that does not divide "
                                          "a module's input to the nearest divisor."},
        "module_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1,
                           "description": "Training only: the fraction of blocks replaced by the identity each step."},
        "coft": {"type": "boolean", "description": "Constrained OFT: bound each block's skew matrix by eps."},
        "eps": {"type": "number", "exclusiveMinimum": 0, "description": "COFT's bound (with coft)."},
        "block_share": {"type": "boolean", "description": "One set of block parameters for every block of a module."},
        "use_cayley_neumann": {"type": "boolean",
                               "description": "Truncated Neumann series instead of the exact Cayley transform."},
        "num_cayley_neumann_terms": {"type": "integer", "minimum": 0,
                                     "description": "Terms of the Neumann series (with use_cayley_neumann)."},
        "init_weights": {"type": "boolean",
                         "description": "true: start at the identity rotation (zeros); false: N(0, 0.1) noise."},
    },
    "required": ["target_modules"],
}
DEFAULTS: dict[str, Any] = {
    "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "r": 0, "oft_block_size": 32,
    "module_dropout": 0.0, "coft": False, "eps": 6e-5, "block_share": False, "use_cayley_neumann": True,
    "num_cayley_neumann_terms": 5, "init_weights": True,
}
TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"enum": list(KINDS)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "r": {"type": "integer", "minimum": 1, "description": "number of blocks the input is cut into"},
        "block_size": {"type": "integer", "minimum": 2, "description": "size of each rotation block"},
    },
    "required": ["r", "block_size"],
}


def _fail(field: str, message: str, found: Any, hint: str | None = None) -> UsageError:
    return UsageError(message, location=f"$.method.config.{field}", found=found, hint=hint, code="bad_option")


def n_elements(block_size: int) -> int:
    """Stored entries per block: the strict upper triangle of a ``block_size`` square."""
    return block_size * (block_size - 1) // 2


def block_size_of(elements: int) -> int | None:
    """The block size whose strict upper triangle has ``elements`` entries, or None."""
    size = (1 + math.isqrt(1 + 8 * elements)) // 2
    return size if n_elements(size) == elements else None


def adjust(in_features: int, value: int) -> int:
    """PEFT's ``OFTLayer.adjust_oft_parameters``: the divisor of ``in_features`` nearest ``value`` (ties: lower)."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def blocks_for(in_features: int, r: int, oft_block_size: int) -> tuple[int, int, bool]:
    """``(r, block_size, adjusted)`` PEFT gives a module with ``in_features`` inputs (``OFTLayer.update_layer``)."""
    if r == 0 and oft_block_size != 0:
        adjusted = in_features % oft_block_size != 0 or oft_block_size > in_features
        size = adjust(in_features, oft_block_size) if adjusted else oft_block_size
        return in_features // size, size, adjusted
    if r != 0 and oft_block_size == 0:
        adjusted = in_features % r != 0 or r > in_features
        blocks = adjust(in_features, r) if adjusted else r
        return blocks, in_features // blocks, adjusted
    raise UsageError(f"give exactly one of r ({r}) and oft_block_size ({oft_block_size}) non-zero",
                     location="$.method.config.r", code="bad_option",
                     hint="r x oft_block_size = the module's input size: set the other one to 0")


# ---- the math in numpy (merge; the torch layer computes the same) -----------------------------

def skew(vectors: np.ndarray, block_size: int) -> np.ndarray:
    """``[b, n] -> [b, s, s]``: ``U - U^T`` with ``U``'s strict upper triangle filled row-major
    (PEFT's ``OFTRotationModule._pytorch_skew_symmetric``, ``torch.triu_indices(s, s, 1)``)."""
    rows, cols = np.triu_indices(block_size, 1)
    out = np.zeros((vectors.shape[0], block_size, block_size), dtype=vectors.dtype)
    out[:, rows, cols] = vectors
    return out - np.swapaxes(out, -1, -2)


def project(vectors: np.ndarray, block_size: int, eps: float) -> np.ndarray:
    """COFT: each block's skew matrix scaled to Frobenius norm ``eps / sqrt(rows)`` when it is larger
    (PEFT's ``OFTRotationModule._project_batch``)."""
    bound = eps / math.sqrt(vectors.shape[0])
    norms = np.linalg.norm(skew(vectors, block_size).reshape(vectors.shape[0], -1), axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = bound * (vectors / norms)
    return np.where(norms <= bound, vectors, scaled)


def cayley(vectors: np.ndarray, block_size: int, neumann: bool, terms: int) -> np.ndarray:
    """``[b, n] -> [b, s, s]`` rotations (PEFT's ``OFTRotationModule._cayley_batch``)."""
    q = skew(vectors, block_size)
    eye = np.broadcast_to(np.eye(block_size, dtype=q.dtype), q.shape)
    if not neumann:  # X (I + Q) = I - Q
        return np.swapaxes(np.linalg.solve(np.swapaxes(eye + q, -1, -2), np.swapaxes(eye - q, -1, -2)), -1, -2)
    out = eye.copy()
    if terms > 1:
        out = out + 2 * q
        if terms > 2:
            power = q @ q
            out = out + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                out = out + 2 * power
            out = out + power @ q
    return out


def rotation_blocks(vectors: np.ndarray, target: Mapping[str, Any], config: Mapping[str, Any]) -> np.ndarray:
    """The module's ``r`` rotation blocks ``[r, s, s]`` (float64) from its stored ``[rows, n]`` tensor."""
    size, blocks = int(target["block_size"]), int(target["r"])
    vectors = np.asarray(vectors, dtype=np.float64)
    if config.get("coft", DEFAULTS["coft"]):
        vectors = project(vectors, size, float(config.get("eps", DEFAULTS["eps"])))
    rotations = cayley(vectors, size, bool(config.get("use_cayley_neumann", DEFAULTS["use_cayley_neumann"])),
                       int(config.get("num_cayley_neumann_terms", DEFAULTS["num_cayley_neumann_terms"])))
    return np.repeat(rotations, blocks, axis=0) if rotations.shape[0] == 1 and blocks > 1 else rotations


def rotate_weight(weight: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """``W [out, in] -> W @ blockdiag(R)^T`` without building the ``[in, in]`` matrix."""
    out = weight.shape[0]
    blocks, size, _ = rotations.shape
    return np.einsum("orc,rkc->ork", weight.reshape(out, blocks, size), rotations).reshape(out, blocks * size)


class OftMethod(WeightAdapterMethod, Method, MergedWeight):
    """OFT: a learned block-diagonal rotation of each adapted module's input (mergeable)."""

    name = "oft"
    version = "1"
    description = ("OFT: orthogonal fine-tuning, a block-diagonal Cayley rotation of the input of linear / "
                   "Conv1D modules (mergeable)")

    # ---- torch-free -----------------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        given = dict(config)
        unknown = sorted(set(given) - set(CONFIG_SCHEMA["properties"]))
        if unknown:
            raise UsageError(f"unknown oft option {unknown[0]!r}", location=f"$.method.config.{unknown[0]}",
                             expected=sorted(CONFIG_SCHEMA["properties"]), hint="check the spelling", code="bad_option")
        if given.get("r") and "oft_block_size" not in given:
            given["oft_block_size"] = 0  # r alone: count the blocks (PEFT would refuse r with its default block size)
        out = {**DEFAULTS, **given}
        out["target_modules"] = check_selection("target_modules", out["target_modules"])
        out["exclude_modules"] = check_selection("exclude_modules", out["exclude_modules"], nullable=True)
        for key in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = out[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _fail(key, f"{key} must be an integer >= 0", value)
        if (out["r"] != 0) == (out["oft_block_size"] != 0):
            raise _fail("r", f"give exactly one of r ({out['r']}) and oft_block_size ({out['oft_block_size']}) "
                             "non-zero", out["r"], "r x oft_block_size = a module's input size: set the other to 0")
        if out["oft_block_size"] == 1:
            raise _fail("oft_block_size", "a block of size 1 has nothing to rotate", 1, "use 2 or more")
        for key in ("coft", "block_share", "use_cayley_neumann", "init_weights"):
            if not isinstance(out[key], bool):
                raise _fail(key, f"{key} must be true or false", out[key])
        dropout = out["module_dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise _fail("module_dropout", "module_dropout must be a number in [0, 1)", dropout)
        eps = out["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
            raise _fail("eps", "eps must be a finite number > 0", eps)
        pattern = out["layers_pattern"]
        if isinstance(pattern, list) and len(pattern) == 1:
            pattern = pattern[0]
        out["layers_to_transform"], out["layers_pattern"] = check_layers(out["layers_to_transform"], pattern)
        return out

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        rows = 1 if config.get("block_share", False) else int(target["r"])
        return {f"{module}.{self.name}.{PARAM}": (rows, n_elements(int(target["block_size"])))}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        kind, shape = target.get("kind"), target.get("shape")
        if kind not in KINDS:
            problems.append(f"kind {kind!r} is not one OFT adapts; expected one of {list(KINDS)}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not a 2-d weight shape [d0, d1]")
            return problems
        r, size = target.get("r"), target.get("block_size")
        if not (isinstance(r, int) and r >= 1 and isinstance(size, int) and size >= 2):
            problems.append(f"r ({r!r}) must be an integer >= 1 and block_size ({size!r}) one >= 2")
        elif kind in KINDS and r * size != in_out_features(kind, shape)[0]:
            problems.append(f"r x block_size = {r} x {size} = {r * size} is not the module's input size "
                            f"{in_out_features(kind, shape)[0]}")
        return problems

    def merged_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                      tensors: Mapping[str, np.ndarray], weight: np.ndarray) -> np.ndarray:
        """The stored weight with the rotation folded in: ``W @ blockdiag(R)^T`` for ``[out, in]``
        (``blockdiag(R) @ W`` for a Conv1D's stored ``[in, out]``), PEFT's ``Linear.merge``; computed in float64."""
        base = np.asarray(weight)
        if tuple(base.shape) != tuple(target["shape"]):
            raise BaseModelError(f"{module}: base weight {list(base.shape)} is not the adapter's {target['shape']}",
                                 location=module, code="shape_mismatch")
        rotations = rotation_blocks(self._tensor(module, target, config, tensors), target, config)
        linear = base.astype(np.float64)
        linear = linear if target["kind"] == "linear" else linear.T
        merged = rotate_weight(linear, rotations)
        merged = merged if target["kind"] == "linear" else merged.T
        return np.ascontiguousarray(merged).astype(base.dtype if base.dtype in (np.float32, np.float64) else np.float32)

    def _tensor(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        value = tensors.get(f"{module}.{self.name}.{PARAM}", tensors.get(PARAM))
        if value is None:
            raise TensorFileError(f"OFT tensor of {module} is missing", location=module,
                                  expected=[f"{module}.{self.name}.{PARAM}"], found=sorted(tensors), code="missing_tensor")
        want = next(iter(self.expected_tensors(module, target, config).values()))
        if tuple(value.shape) != want:
            raise TensorFileError(f"OFT tensor of {module} has shape {list(value.shape)}", location=module,
                                  expected=list(want), code="tensor_shape")
        return np.asarray(value)

    # ---- torch (adapterkit_oft.layer imports torch) ---------------------------------------
    @property
    def layer_class(self) -> type:
        from .layer import OftLayer

        return OftLayer

    def target_fields(self, module: str, kind: str, shape: list[int], config: Mapping[str, Any]) -> dict[str, Any]:
        fan_in = in_out_features(kind, shape)[0]
        blocks, size, adjusted = blocks_for(fan_in, int(config["r"]), int(config["oft_block_size"]))
        if size < 2:
            raise UsageError(f"{module}: OFT would cut its {fan_in} inputs into blocks of size {size}",
                             location=module, hint="choose an oft_block_size (or r) that gives blocks of 2 or more",
                             code="bad_option")
        if adjusted:
            warnings.warn(f"{module}: oft_block_size / r adjusted (as PEFT does) to {blocks} blocks of {size}",
                          stacklevel=2)
        return {"r": blocks, "block_size": size}

    def new_parameters(self, layer: Any, config: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
        """Zeros (the identity rotation) or, with ``init_weights`` false, N(0, 0.1) (PEFT's ``reset_oft_parameters``)."""
        import torch

        rows = 1 if config["block_share"] else int(target["r"])
        value = torch.zeros(rows, n_elements(int(target["block_size"])), device=layer.base_layer.weight.device)
        if not config["init_weights"]:
            torch.nn.init.normal_(value, mean=0.0, std=0.1)
        return {PARAM: torch.nn.Parameter(value)}
