"""Bottleneck adapters as an adapterkit :class:`Method` (Houlsby 2019, Pfeiffer 2020, He et al. 2021 parallel).

Targets: one per adapter, keyed by the path of the layer norm of the residual
branch the adapter sits on: the block's ``LayerNorm`` in post-LN models (BERT
``attention.output.LayerNorm`` / ``output.LayerNorm``, which the adapter's output
feeds), the sub-layer's pre-norm in pre-LN models (Llama ``input_layernorm`` /
``post_attention_layernorm``, GPT-2 ``ln_1`` / ``ln_2``, whose input is the
residual the adapter reads). Its weight ``[hidden]`` is the ``shape``, so
``validate --base`` checks the module and the hidden size from the base's
headers, and a reader needs nothing but the adapter to fill it in::

    {"kind": "block", "site": "ffn", "shape": [32], "size": 2}

Canonical tensors per target ``m``: ``m.bottleneck.down.weight`` ``[size, hidden]``,
``m.bottleneck.down.bias`` ``[size]``, ``m.bottleneck.up.weight`` ``[hidden, size]``,
``m.bottleneck.up.bias`` ``[hidden]``; with ``ln_before`` / ``ln_after``
``m.bottleneck.ln_before.weight`` / ``.bias`` ``[hidden]`` (and ``ln_after``);
with ``scaling`` "learned" ``m.bottleneck.scale`` ``[1]``, "channel" ``[hidden]``.

This module imports no torch; the torch side is ``layer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adapterkit.core.errors import BaseModelError, TensorFileError, UsageError
from adapterkit.core.plugin.capabilities import RuntimeComposable
from adapterkit.core.plugin.method import Method

from .config import (
    CONFIG_SCHEMA, DEFAULTS, PRESETS, SITES, TARGET_SCHEMA, bottleneck_size, minimal, preset_defaults, validate_config,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

METHOD = "bottleneck"
MERGE_REFUSAL = (
    "a bottleneck adapter cannot be merged into the base weights: it adds a sub-network "
    "(down projection, non-linearity, up projection) whose non-linearity sits between the two projections, "
    "so its effect is not a linear map of any base weight's input and no weight change reproduces it; "
    "keep it as an adapter (apply it at load time) or export the whole adapted model"
)


def param_shapes(hidden: int, size: int, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``<param>`` -> shape of one adapter (``config`` may be a manifest's minimal config)."""
    preset = config.get("preset", DEFAULTS["preset"])
    config = {**(preset_defaults(preset) if preset in PRESETS else DEFAULTS), **config}
    shapes: dict[str, tuple[int, ...]] = {
        "down.weight": (size, hidden), "down.bias": (size,), "up.weight": (hidden, size), "up.bias": (hidden,),
    }
    for norm in ("ln_before", "ln_after"):
        if config.get(norm, DEFAULTS[norm]):
            shapes[f"{norm}.weight"] = (hidden,)
            shapes[f"{norm}.bias"] = (hidden,)
    scaling = config.get("scaling", DEFAULTS["scaling"])
    if scaling == "learned":
        shapes["scale"] = (1,)
    elif scaling == "channel":
        shapes["scale"] = (hidden,)
    return shapes


class BottleneckMethod(Method, RuntimeComposable):
    """Bottleneck adapters after the attention and/or feed-forward sub-layers, sequential or parallel."""

    name = METHOD
    version = "1"
    description = "Bottleneck adapters (Houlsby, Pfeiffer, parallel He et al.): AdapterHub seq_bn / double_seq_bn / par_bn math"
    composition_kinds = ("stack", "average", "weighted_sum")

    # ---- torch-free -----------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return validate_config(config)

    def minimal_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return minimal(config)

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        shapes = param_shapes(int(target["shape"][0]), int(target["size"]), config)
        return {f"{module}.{METHOD}.{param}": shape for param, shape in shapes.items()}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        if target.get("kind") != "block":
            problems.append(f"kind {target.get('kind')!r} is not one bottleneck adapters use; expected 'block'")
        if target.get("site") not in SITES:
            problems.append(f"site {target.get('site')!r} is not one of {list(SITES)}")
        shape, size = target.get("shape"), target.get("size")
        if not (isinstance(shape, list) and len(shape) == 1 and all(_is_int(d) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not the 1-d shape [hidden] of a layer norm's weight")
        if not (_is_int(size) and size is not None and size >= 1):
            problems.append(f"size is {size!r}; the bottleneck width must be an integer >= 1")
        return problems

    def merge_refusal(self, config: Mapping[str, Any]) -> str | None:
        return MERGE_REFUSAL

    # ---- torch ----------------------------------------------------------------
    def inject(self, model: torch.nn.Module, config: Mapping[str, Any], adapter_name: str = "default",
               targets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        import torch

        from .layer import BottleneckAdapter, attach, find_sites

        config = validate_config(config)
        _check_adapter_name(adapter_name)
        available = find_sites(model)
        if not available:
            raise UsageError(
                f"found no transformer layer in {type(model).__name__} that bottleneck adapters can follow",
                hint="supported: BERT-style post-LN layers (attention.output / output with dense, dropout, LayerNorm), "
                     "Llama-style (input_layernorm, self_attn.o_proj, post_attention_layernorm, mlp.down_proj) and "
                     "GPT-2-style (ln_1, attn.c_proj, ln_2, mlp.c_proj) pre-LN layers",
                code="no_targets",
            )
        if targets is not None:
            plan = _plan_from_targets(model, available, targets)
        else:
            plan = _plan_from_config(model, available, config)
        _check_style(plan, config)
        for sp, _ in plan.values():
            site = getattr(model.get_submodule(sp.owner_path), sp.container_name, None)
            if site is not None and adapter_name in site.adapters:
                raise UsageError(f"{sp.anchor_path} already holds a bottleneck adapter named {adapter_name!r}",
                                 hint="inject under another name", code="duplicate_adapter")
        keep_trainable = _adapter_parameter_ids(model)
        for param in model.parameters():
            if id(param) not in keep_trainable:
                param.requires_grad_(False)
        for sp, entry in plan.values():
            weight = model.get_submodule(sp.anchor_path).get_parameter("weight")
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            adapter = BottleneckAdapter(entry["shape"][0], entry["size"], config, dtype=dtype, device=weight.device)
            site = attach(model, sp)
            site.adapters[adapter_name] = adapter.train(site.training)
            for param in adapter.parameters():
                param.requires_grad_(True)
        return {path: entry for path, (_, entry) in plan.items()}

    def load_state(self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
        import torch

        params = _named_adapter_params(model, adapter_name)
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise TensorFileError(
                f"bottleneck tensors do not match the injected adapter {adapter_name!r}: "
                f"{len(missing)} missing, {len(unexpected)} unexpected",
                expected={"missing": missing[:8]}, found={"unexpected": unexpected[:8]},
                hint="the tensors must be the canonical <module>.bottleneck.<param> of exactly the adapted modules "
                     "(ln_before / ln_after / scaling in the config decide which params exist)",
                code="tensor_mismatch",
            )
        for key, param in params.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise TensorFileError("bottleneck tensor has the wrong shape", location=key, expected=list(param.shape),
                                      found=list(tensors[key].shape), code="tensor_shape")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))

    def extract_state(self, model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        return {key: param.detach().clone() for key, param in _named_adapter_params(model, adapter_name).items()}

    def trainable_parameters(self, model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
        return list(_named_adapter_params(model, adapter_name).values())

    def set_enabled(self, model: torch.nn.Module, enabled: bool) -> None:
        from .layer import sites

        for _, site in sites(model):
            site.enabled = enabled

    def activate_composition(self, model: torch.nn.Module, composition: Any) -> None:
        """Every site runs ``composition`` (AdapterHub's Stack / Average) over the members it holds."""
        from .layer import sites

        for name in composition.members():
            if not sites(model, name):
                raise UsageError(f"the model holds no bottleneck adapter named {name!r}", code="unknown_adapter")
        for _, site in sites(model):
            site.composition = composition

    def deactivate_composition(self, model: torch.nn.Module) -> None:
        from .layer import sites

        for _, site in sites(model):
            site.composition = None

    def unload(self, model: torch.nn.Module) -> torch.nn.Module:
        """Remove every bottleneck site and hook; the model is the base again (nothing was folded in).

        The model's bottleneck handles (``adapterkit.core.runtime.inject.attached``) are dropped too.
        """
        from adapterkit import attached, detach

        from .layer import detach_site, sites

        for name in [name for name, injected in attached(model).items() if injected.method.name == self.name]:
            detach(model, name)
        for _, site in sites(model):
            detach_site(model, site)
        return model


# ---- helpers ----------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise UsageError("adapter name must be a non-empty string without '.'", found=name, code="bad_name")


def _anchor_shape(model: torch.nn.Module, anchor_path: str) -> list[int]:
    """The weight shape ``[hidden]`` of a site's layer norm."""
    weight = getattr(model.get_submodule(anchor_path), "weight", None)
    if weight is None or weight.dim() != 1:
        raise UsageError(f"{anchor_path} has no 1-d weight; bottleneck adapters need an affine layer norm there",
                         location=anchor_path, code="bad_target")
    return list(weight.shape)


def _plan_from_config(model: torch.nn.Module, available: list[Any],
                      config: Mapping[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    wanted = {site for site in SITES if config[f"{site}_adapter"]}
    plan = {}
    for sp in available:
        if sp.site not in wanted or sp.layer in config["leave_out"]:
            continue
        shape = _anchor_shape(model, sp.anchor_path)
        size = bottleneck_size(config, shape[0], sp.layer)
        plan[sp.anchor_path] = (sp, {"kind": "block", "site": sp.site, "shape": shape, "size": size})
    if not plan:
        raise UsageError("the config selects no layer of the model (leave_out covers them all?)",
                         location="$.method.config.leave_out", found=config["leave_out"], code="no_targets")
    return plan


def _plan_from_targets(model: torch.nn.Module, available: list[Any],
                       targets: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Check every recorded target against the model before anything is attached."""
    hint = "apply the adapter to the base model it was made for"
    by_anchor = {sp.anchor_path: sp for sp in available}
    plan = {}
    for path, target in targets.items():
        sp = by_anchor.get(path)
        if sp is None:
            raise BaseModelError(f"{path} is not the layer norm of an attention or feed-forward sub-layer "
                                 "this model has", location=path, hint=hint, code="missing_module")
        if target.get("site") != sp.site:
            raise BaseModelError(f"{path} follows the {sp.site} sub-layer, not the recorded one", location=path,
                                 expected=target.get("site"), found=sp.site, hint=hint, code="kind_mismatch")
        shape = _anchor_shape(model, path)
        if shape != list(target["shape"]):
            raise BaseModelError(f"module {path}: base weight shape differs from the adapter's", location=path,
                                 expected=list(target["shape"]), found=shape, hint=hint, code="shape_mismatch")
        plan[path] = (sp, {"kind": "block", "site": sp.site, "shape": shape, "size": int(target["size"])})
    if not plan:
        raise UsageError("the adapter has no targets", code="no_targets")
    return plan


def _check_style(plan: Mapping[str, tuple[Any, dict[str, Any]]], config: Mapping[str, Any]) -> None:
    from .layer import PRE_LN

    if config["residual_before_ln"] == "post_add" and not config["parallel"]:
        pre_ln = sorted(path for path, (sp, _) in plan.items() if sp.style == PRE_LN)
        if pre_ln:
            raise UsageError('residual_before_ln="post_add" needs a post-LN model (BERT-style); this layer normalises '
                             "before its sub-layers", location="$.method.config.residual_before_ln", found=pre_ln[0],
                             hint="use residual_before_ln=True or False", code="bad_config")


def _named_adapter_params(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    from .layer import sites

    found = sites(model, adapter_name)
    if not found:
        raise UsageError(f"the model holds no bottleneck adapter named {adapter_name!r}", code="unknown_adapter")
    params = {}
    for anchor, site in found:
        for param_name, param in site.adapters[adapter_name].named_parameters():
            params[f"{anchor}.{METHOD}.{param_name}"] = param
    return params


def _adapter_parameter_ids(model: torch.nn.Module) -> set[int]:
    """Parameters of adapters already in the model (any method): injection leaves them as they are."""
    from adapterkit import attached

    from .layer import sites

    ids = {id(p) for _, site in sites(model) for p in site.parameters()}
    for injected in attached(model).values():
        ids.update(id(p) for p in injected.parameters())
    return ids
