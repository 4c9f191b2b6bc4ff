"""The PEFT ``BOFT`` codec: BOFT adapters inside adapterkit's ``peft`` format (PEFT 0.21's layout).

Two tensors per adapted module (``peft/tuners/boft/layer.py``: ``BOFTLayer.update_layer``; the adapter
name is stripped from the key on save)::

    base_model.model.<module>.boft_R   [N, block_num, block_size, block_size]
    base_model.model.<module>.boft_s   [out, 1]

The canonical tensors ``<module>.boft.R`` / ``<module>.boft.s`` are the same arrays, byte for byte.
The tensors determine every shape (``in = block_num * block_size``, ``out``), so reading needs no
base model; PEFT 0.21's BOFT adapts ``nn.Linear`` (and ``nn.Conv2d``) only, never a transformers
``Conv1D``, so every module read is ``linear`` and a ``conv1d`` target cannot be written.

PEFT quirk: without its CUDA ``fbd`` extension (any CPU machine) PEFT replaces
``boft_n_butterfly_factor`` by 1 when it builds the layers, so a folder saved there holds ``N = 1``
tensors under a config that may say more. The function PEFT computes with such a folder is the
one-factor one; it is read as such (``n_butterfly_factor`` 1, with a warning) and written back with
``boft_n_butterfly_factor: 1``, which every PEFT loads alike. A folder with ``N > 1`` loads in PEFT only
where the extension builds (a CUDA machine with ninja).

PEFT 0.11 and 0.12 also saved each module's butterfly permutations, ``boft_P [N, in, in]`` (a buffer
PEFT builds from the shapes; 0.13 stopped saving it). Such a file is read when every ``boft_P`` is
the permutation PEFT builds for its module, and refused otherwise; it is not written (those releases
build it when they load).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    Adapter, BaseModelError, Codec, FormatError, LossyConversionError, check_tensor_dims,
)

from .method import DEFAULTS, block_problem, butterfly_perms

LEAVES = {"R": "boft_R", "s": "boft_s"}
#: the butterfly permutations PEFT 0.11 / 0.12 saved beside them (checked, not kept)
PERMUTATION = "boft_P"
_READ_LEAVES = {**LEAVES, "P": PERMUTATION}
#: every field of PEFT 0.21.2's BOFTConfig besides PeftConfig's
KNOWN_FIELDS = frozenset({"boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "target_modules",
                          "exclude_modules", "boft_dropout", "fan_in_fan_out", "bias", "modules_to_save",
                          "init_weights", "layers_to_transform", "layers_pattern"})
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def _lossy(field: str, value: Any, message: str, file: str, hint: str) -> LossyConversionError:
    return LossyConversionError(message, file=file, location=f"$.{field}", found=value, hint=hint, code="unsupported")


class BoftPeftCodec(Codec):
    """PEFT's BOFT layout for the ``boft`` method."""

    format = "peft"
    key = "BOFT"
    methods = ("boft",)
    description = "PEFT BOFT (butterfly orthogonal fine-tuning of linear modules)"

    # ---- read -----------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        config, file, config_file = context.config, context.tensors_file, context.config_file
        context.refuse_unknown_fields(KNOWN_FIELDS, "boft")
        self._check_config(config, config_file)
        raw = context.tensors
        check_tensor_dims(raw, file)
        found: dict[str, dict[str, np.ndarray]] = {}
        other = []
        for key, value in raw.items():
            for param, leaf in _READ_LEAVES.items():
                module = context.module_of(key, leaf)
                if module is not None:
                    found.setdefault(module, {})[param] = value
                    break
            else:
                other.append(key)
        if other:
            raise LossyConversionError(
                f"the file holds {len(other)} tensors that are not BOFT's boft_R / boft_s; they would be lost",
                file=file, found=sorted(other)[:5],
                hint="modules_to_save or a trained bias (bias='boft_only' / 'all') has no place in a BOFT adapter",
                code="unsupported")
        if not found:
            raise FormatError(f"the file holds no BOFT tensor ({context.key('<module>', 'boft_R')})", file=file,
                              code="no_targets")
        size_cfg, num_cfg = int(config.get("boft_block_size", 4) or 0), int(config.get("boft_block_num", 0) or 0)
        factors_cfg = int(config.get("boft_n_butterfly_factor", 1))
        targets: dict[str, dict[str, Any]] = {}
        tensors: dict[str, np.ndarray] = {}
        dtypes, factors, warnings = set(), set(), []
        for module, pair in sorted(found.items()):
            missing = sorted(set(LEAVES) - set(pair))
            if missing:
                raise FormatError(f"module {module} has no {LEAVES[missing[0]]}", file=file,
                                  location=context.key(module, LEAVES[missing[0]]), code="missing_tensor")
            r, s = pair["R"], pair["s"]
            if r.ndim != 4 or r.shape[2] != r.shape[3]:
                raise FormatError(f"boft_R has shape {list(r.shape)}, PEFT stores [N, block_num, block_size, block_size]",
                                  file=file, location=context.key(module, "boft_R"), code="tensor_shape")
            if s.ndim != 2 or s.shape[1] != 1:
                raise FormatError(f"boft_s has shape {list(s.shape)}, PEFT stores [out, 1]", file=file,
                                  location=context.key(module, "boft_s"), code="tensor_shape")
            n, num, size = (int(d) for d in r.shape[:3])
            fan_in, fan_out = num * size, int(s.shape[0])
            if (size_cfg and size != size_cfg) or (not size_cfg and num != num_cfg):
                field, want = ("boft_block_size", size_cfg) if size_cfg else ("boft_block_num", num_cfg)
                raise FormatError(f"boft_R of {module} has {num} blocks of {size}, the config's {field} is {want}",
                                  file=file, location=context.key(module, "boft_R"), code="tensor_shape")
            if n != factors_cfg:
                if n != 1:
                    raise FormatError(f"boft_R of {module} holds {n} butterfly factors, the config's "
                                      f"boft_n_butterfly_factor is {factors_cfg}", file=file,
                                      location=context.key(module, "boft_R"), code="tensor_shape")
                if not warnings:
                    warnings.append(f"{config_file}: boft_n_butterfly_factor is {factors_cfg} but the tensors hold one "
                                    "factor (PEFT saved it without its CUDA extension, which replaces the factor by 1); "
                                    "read with one butterfly factor, the function PEFT computes with this folder")
            problem = block_problem(fan_in, size, num, n)
            if problem:
                raise FormatError(f"{module}: {problem[1]}", file=file, location=context.key(module, "boft_R"),
                                  code="tensor_shape")
            if "P" in pair:
                _check_permutations(module, pair["P"], butterfly_perms(fan_in, size, num, n),
                                    context.key(module, PERMUTATION), file)
            if context.base is not None:
                _check_base(module, context.base_module(module, kinds=("linear",)).shape, [fan_out, fan_in])
            targets[module] = {"kind": "linear", "shape": [fan_out, fan_in], "block_size": size, "block_num": num,
                               "n_butterfly_factor": n}
            tensors[f"{module}.boft.R"] = r
            tensors[f"{module}.boft.s"] = s
            dtypes.update({str(r.dtype), str(s.dtype)})
            factors.add(n)
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
            raise FormatError("the BOFT tensors must share one float dtype", file=file, found=sorted(dtypes),
                              code="dtype")
        method_config = _method_config(config, targets, factors.pop())
        return context.adapter("boft", method_config, targets, tensors, dtypes.pop(), base_model=context.base_fields(),
                               warnings=warnings)

    @staticmethod
    def _check_config(config: Mapping[str, Any], file: str) -> None:
        bias = config.get("bias", "none")
        if bias != "none":
            raise _lossy("bias", bias, f"bias={bias!r} trains the adapted modules' biases, which a boft adapter "
                         "does not hold", file, "only bias='none' converts")
        if config.get("modules_to_save"):
            raise _lossy("modules_to_save", config["modules_to_save"], "modules_to_save (fully trained modules) has "
                         "no place in a boft adapter; they would be lost", file, "only modules_to_save=null converts")
        for field, low in (("boft_block_size", 0), ("boft_block_num", 0), ("boft_n_butterfly_factor", 1)):
            value = config.get(field, DEFAULTS[field])
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise FormatError(f"{field} must be an integer >= {low}", file=file, location=f"$.{field}", found=value,
                                  hint="fix the value in adapter_config.json (PEFT itself could not load it)",
                                  code="bad_config")
        if (config.get("boft_block_size", 4) == 0) == (config.get("boft_block_num", 0) == 0):
            raise FormatError("exactly one of boft_block_size and boft_block_num must be non-zero", file=file,
                              location="$.boft_block_size",
                              found={k: config.get(k) for k in ("boft_block_size", "boft_block_num")},
                              hint="PEFT's BOFTConfig refuses this config too", code="bad_config")
        dropout = config.get("boft_dropout", 0.0)
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
            raise FormatError("boft_dropout must be a number in [0, 1)", file=file, location="$.boft_dropout",
                              found=dropout, code="bad_config")
        init = config.get("init_weights", True)
        if not isinstance(init, bool):
            raise _lossy("init_weights", init, f"init_weights={init!r} is not a BOFT initialisation adapterkit "
                         "holds", file, "use true or false")

    # ---- write ----------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        targets = adapter.targets
        expected = {f"{m}.boft.{p}" for m in targets for p in LEAVES}
        missing = sorted(expected - set(adapter.tensors))
        if missing:
            return f"the tensor {missing[0]} is missing"
        extra = sorted(set(adapter.tensors) - expected)
        if extra:
            return f"the tensor {extra[0]} has no place in a PEFT BOFT file and would be lost"
        conv1d = sorted(m for m, t in targets.items() if t.get("kind") != "linear")
        if conv1d:
            return (f"{conv1d[0]} is a {targets[conv1d[0]].get('kind')!r} target; PEFT 0.21's BOFT adapts nn.Linear "
                    "modules only (it refuses transformers Conv1D), so PEFT could not load it")
        if len({t["n_butterfly_factor"] for t in targets.values()}) != 1:
            return "the modules have different numbers of butterfly factors; PEFT's config holds one"
        if _blocks(targets, {}, {}) is None:
            return ("the modules share neither one block size nor one number of blocks; PEFT's config holds one "
                    "boft_block_size or one boft_block_num for every module")
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        targets, config, original = adapter.targets, adapter.config, context.original
        modules = sorted(targets)
        tensors = {}
        for module in modules:
            for param, leaf in LEAVES.items():
                tensors[context.key(module, leaf)] = np.asarray(adapter.tensors[f"{module}.boft.{param}"])
        size, num = _blocks(targets, original, config)  # type: ignore[misc]
        selection = context.selection(modules, wanted=config.get("target_modules"),
                                      layers=config.get("layers_to_transform"))
        fields = {
            **selection,
            "boft_block_size": size,
            "boft_block_num": num,
            "boft_n_butterfly_factor": next(iter(targets.values()))["n_butterfly_factor"],
            "boft_dropout": config.get("boft_dropout", 0.0),
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "init_weights": config.get("init_weights", original.get("init_weights", True)),
        }
        return fields, tensors


def _blocks(targets: Mapping[str, Mapping[str, Any]], original: Mapping[str, Any],
            config: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(boft_block_size, boft_block_num)`` (one of them 0) under which PEFT gives every module its blocks:
    the mode of the original PEFT config, else the adapter config's, else a shared size, else a shared number."""
    sizes = {int(t["block_size"]) for t in targets.values()}
    nums = {int(t["block_num"]) for t in targets.values()}
    modes = []
    for source in (original, config):
        if source.get("boft_block_num") and not source.get("boft_block_size"):
            modes.append("num")
        elif source.get("boft_block_size"):
            modes.append("size")
    for mode in (*modes, "size", "num"):
        if mode == "size" and len(sizes) == 1:
            return sizes.pop(), 0
        if mode == "num" and len(nums) == 1:
            return 0, nums.pop()
    return None


def _method_config(config: Mapping[str, Any], targets: Mapping[str, Any], factors: int) -> dict[str, Any]:
    """The boft method config of a PEFT BOFT config, non-default values only."""
    target_modules = config.get("target_modules")
    if isinstance(target_modules, list) and target_modules:
        target_modules = sorted(set(target_modules))
    elif not (isinstance(target_modules, str) and target_modules):
        target_modules = sorted({m.rsplit(".", 1)[-1] for m in targets})
    out: dict[str, Any] = {"target_modules": target_modules}
    exclude = config.get("exclude_modules")
    if exclude:
        out["exclude_modules"] = sorted(set(exclude)) if isinstance(exclude, list) else exclude
    layers = config.get("layers_to_transform")
    if layers is not None and layers != []:
        out["layers_to_transform"] = [layers] if isinstance(layers, int) else list(layers)
        if config.get("layers_pattern") not in (None, [], ""):
            out["layers_pattern"] = config["layers_pattern"]
    values = {"boft_block_size": int(config.get("boft_block_size", 4) or 0),
              "boft_block_num": int(config.get("boft_block_num", 0) or 0),
              "boft_n_butterfly_factor": factors, "boft_dropout": config.get("boft_dropout", 0.0),
              "init_weights": config.get("init_weights", True)}
    out.update({k: v for k, v in values.items() if v != DEFAULTS[k]})
    return out


def _check_base(module: str, stored: list[int], shape: list[int]) -> None:
    if list(stored) != shape:
        raise BaseModelError(f"{module}: the BOFT tensors make a [out, in] = {shape} weight, the base's is "
                             f"{list(stored)}", location=module, hint="is this the right base model?", code="wrong_base")


def _check_permutations(module: str, saved: np.ndarray, perms: tuple[tuple[int, ...], ...], key: str,
                        file: str) -> None:
    """A saved ``boft_P`` must be the permutation matrices PEFT builds (``P[j, perm[j]] = 1``): then it holds
    nothing the shapes do not, and is not kept."""
    fan_in = len(perms[0])
    if saved.shape != (len(perms), fan_in, fan_in):
        raise FormatError(f"boft_P of {module} has shape {list(saved.shape)}, PEFT builds [{len(perms)}, {fan_in}, "
                          f"{fan_in}] for it", file=file, location=key, code="tensor_shape")
    want = np.zeros(saved.shape, dtype=np.float64)
    for i, perm in enumerate(perms):
        want[i, np.arange(fan_in), perm] = 1.0
    if not np.array_equal(saved.astype(np.float64), want):
        raise LossyConversionError(f"boft_P of {module} is not the butterfly permutation PEFT builds for its shapes; "
                                   "a boft adapter holds no other permutation and it would be lost", file=file,
                                   location=key, code="unsupported")
