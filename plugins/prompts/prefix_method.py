"""Prefix tuning (Li & Liang, 2021) as an adapterkit :class:`Method`.

The layout (targets, keys, shapes) is in ``layout``; the torch side in
``module``. Not mergeable: the prefixes are extra attention keys and values,
not a change of any weight. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from adapterkit.core.errors import BaseModelError, TensorFileError, UsageError
from adapterkit.core.plugin.hookspecs import hookimpl
from adapterkit.core.plugin.method import Method

from .prefix_config import CONFIG_SCHEMA, DEFAULTS, TARGET_SCHEMA, validate_config
from .prefix_layout import expected, layer_plans, prefix_targets, target_problems

if TYPE_CHECKING:  # pragma: no cover
    import torch


class PrefixTuningMethod(Method):
    """Learned key/value prefixes in every layer's self-attention."""

    name = "prefix"
    version = "1"
    description = "Prefix tuning: learned key/value prefixes in every attention layer (not mergeable)"

    # ---- torch-free -------------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return validate_config(config)

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return expected(module, target, config)

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        return target_problems(target)

    def merge_refusal(self, config: Mapping[str, Any]) -> str | None:
        return ("prefix tuning cannot be merged into the base weights: its prefixes are extra keys and values "
                "every attention layer attends to, not a change of any weight (an exported graph carries them as constants)")

    # ---- torch ------------------------------------------------------------------
    def inject(self, model: torch.nn.Module, config: Mapping[str, Any], adapter_name: str = "default",
               targets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """New prefixes for every layer. With ``targets`` (applying a saved adapter) they are held directly,
        without the MLP, whatever ``prefix_projection`` says: the saved tensors are its folded output.
        """
        from adapterkit import attached
        from . import virtual
        from .prompt_layout import model_dims

        from .prefix_module import CHILD, PrefixEncoder, PrefixTuning, prefix_tuning, weight_shapes

        config = validate_config(config)
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise UsageError("adapter name must be a non-empty string without '.'", found=adapter_name, code="bad_name")
        params = virtual._signature(type(model).forward).parameters
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise UsageError(f"{type(model).__name__} is an encoder-decoder model; prefix tuning here covers "
                             "decoder-only models", code="bad_model")
        if "cache" not in params and "past_key_values" not in params:
            raise UsageError(f"{type(model).__name__}.forward takes no KV cache, which prefix tuning needs",
                             hint="use prefix tuning on a decoder (causal LM) model, or prompt tuning", code="bad_model")
        shapes = weight_shapes(model)
        dims = model_dims(getattr(model, "config", {}))
        found = prefix_targets(shapes, dims)
        if targets is not None:
            _check_targets(targets, found)
            found = {path: dict(target) for path, target in targets.items()}
        plans = layer_plans(found)
        container = prefix_tuning(model)
        if container is not None:
            if adapter_name in container.encoders:
                raise UsageError(f"the model already holds a prefix-tuning adapter named {adapter_name!r}",
                                 hint="inject under another name", code="duplicate_adapter")
            if container.plans != plans:
                raise UsageError("a second prefix adapter must have the same layers and head layout",
                                 code="bad_target")
        keep = {id(p) for injected in attached(model).values() for p in injected.parameters()}
        for param in model.parameters():
            if id(param) not in keep:
                param.requires_grad_(False)
        projection = config["prefix_projection"] and targets is None
        device = next((p.device for p in model.parameters()), None)
        encoder = PrefixEncoder(config["num_virtual_tokens"], len(plans), plans[0].kv_dim, projection=projection,
                                hidden=config["encoder_hidden_size"], init=config["init"], device=device)
        if container is None:
            container = PrefixTuning(plans)
            model.add_module(CHILD, container)
            container.attach(model)
        container.encoders[adapter_name] = encoder
        for param in encoder.parameters():
            param.requires_grad_(True)
        return found

    def load_state(self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
        """Copy folded prefixes in (an adapter training through the MLP then holds them directly)."""
        import torch

        container, encoder = _encoder(model, adapter_name)
        wanted = _expected_keys(container, encoder)
        missing, unexpected = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
        if missing or unexpected:
            raise TensorFileError(
                f"prefix-tuning tensors do not match the injected adapter {adapter_name!r}: "
                f"{len(missing)} missing, {len(unexpected)} unexpected",
                expected={"missing": missing}, found={"unexpected": unexpected},
                hint="a prefix adapter holds <key projection>.prefix.key and <value projection>.prefix.value "
                "for every layer", code="tensor_mismatch",
            )
        for key in wanted:
            if tuple(tensors[key].shape) != (encoder.count, container.kv_dim):
                raise TensorFileError("prefix-tuning tensor has the wrong shape", location=key,
                                      expected=[encoder.count, container.kv_dim], found=list(tensors[key].shape),
                                      code="tensor_shape")
        blocks = []
        for plan in container.plans:
            blocks += [tensors[plan.key].float(), tensors[plan.value].float()]
        folded = torch.cat(blocks, dim=1)
        if encoder.projected:
            encoder.set_folded(folded)
            encoder.weight.requires_grad_(True)
        else:
            with torch.no_grad():
                encoder.weight.copy_(folded.to(device=encoder.weight.device, dtype=encoder.weight.dtype))

    def extract_state(self, model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The folded prefixes (the MLP's output when training through it)."""
        import torch

        container, encoder = _encoder(model, adapter_name)
        with torch.no_grad():
            values = encoder().detach()
        out = {}
        for plan in container.plans:
            out[plan.key] = container.layer_slice(values, plan, 0).clone()
            out[plan.value] = container.layer_slice(values, plan, 1).clone()
        return out

    def trainable_parameters(self, model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
        _, encoder = _encoder(model, adapter_name)
        return list(encoder.parameters())

    def set_enabled(self, model: torch.nn.Module, enabled: bool) -> None:
        from .prefix_module import prefix_tuning

        container = prefix_tuning(model)
        if container is not None:
            container.enabled = enabled

    def unload(self, model: torch.nn.Module) -> torch.nn.Module:
        """Remove the prefixes and the hook; the model is the base again."""
        from adapterkit import attached, detach

        from .prefix_module import CHILD, prefix_tuning

        for name in [name for name, injected in attached(model).items() if injected.method.name == self.name]:
            detach(model, name)
        container = prefix_tuning(model)
        if container is not None:
            container.detach()
            delattr(model, CHILD)
        return model


def _check_targets(targets: Mapping[str, Mapping[str, Any]], found: Mapping[str, Mapping[str, Any]]) -> None:
    """A saved adapter's targets must be the model's key/value projections, with the same shapes and heads."""
    hint = "apply the adapter to the base model it was made for"
    if set(targets) != set(found):
        raise BaseModelError("the adapter's attention projections are not the model's", location="$.targets",
                             expected=sorted(found), found=sorted(targets), hint=hint, code="missing_module")
    for path, target in targets.items():
        for field in ("kind", "shape", "layer", "heads", "head_dim"):
            if target.get(field) != found[path][field]:
                raise BaseModelError(f"module {path}: {field} differs from the adapter's", location=path,
                                     expected=target.get(field), found=found[path][field], hint=hint,
                                     code="shape_mismatch")


def _encoder(model: torch.nn.Module, adapter_name: str) -> tuple[Any, Any]:
    from .prefix_module import prefix_tuning

    container = prefix_tuning(model)
    if container is None or adapter_name not in container.encoders:
        raise UsageError(f"the model holds no prefix-tuning adapter named {adapter_name!r}", code="unknown_adapter")
    return container, container.encoders[adapter_name]


def _expected_keys(container: Any, encoder: Any) -> list[str]:
    return [key for plan in container.plans for key in (plan.key, plan.value)]


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``prefix`` method (entry point ``prefix``)."""
    register(PrefixTuningMethod())


@hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``PREFIX_TUNING`` codec (method ``prefix``)."""
    from .peft_codec import PrefixTuningCodec

    register(PrefixTuningCodec())
