"""Prompt tuning (Lester et al., 2021) as an adapterkit :class:`Method`.

Layout: one target, the model's input token embedding ``e`` (kind
``embedding``, shape ``[vocab_size, hidden]``), and one tensor
``e.prompt.embeddings`` ``[num_virtual_tokens, hidden]``, e.g.
``model.embed_tokens.prompt.embeddings`` for Llama, ``transformer.wte...``
for GPT-2. The embedding anchors the adapter: the prompts live in its space,
and ``validate --base`` checks its shape.

Not mergeable: virtual tokens are extra inputs, not a change of any weight.

This module imports no torch; ``module`` holds the torch side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from adapterkit.core.errors import BaseModelError, TensorFileError, UsageError
from adapterkit.core.plugin.hookspecs import hookimpl
from adapterkit.core.plugin.method import Method

from .prompt_config import CONFIG_SCHEMA, DEFAULTS, TARGET_SCHEMA, validate_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

PARAM = "embeddings"
KIND = "embedding"


def _shape_ok(shape: Any) -> bool:
    return isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)


class PromptTuningMethod(Method):
    """Learned virtual-token embeddings prepended to the input embeddings."""

    name = "prompt"
    version = "1"
    description = "Prompt tuning: learned virtual tokens prepended to the input embeddings (not mergeable)"

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
        count = int(config.get("num_virtual_tokens", DEFAULTS["num_virtual_tokens"]))
        return {f"{module}.{self.name}.{PARAM}": (count, int(target["shape"][1]))}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        if target.get("kind") != KIND:
            problems.append(f"kind {target.get('kind')!r}: prompt tuning anchors on the input embedding (kind {KIND!r})")
        if not _shape_ok(target.get("shape")):
            problems.append(f"shape {target.get('shape')!r} is not an embedding shape [vocab_size, hidden]")
        return problems

    def merge_refusal(self, config: Mapping[str, Any]) -> str | None:
        return ("prompt tuning cannot be merged into the base weights: its virtual tokens are extra inputs "
                "prepended to every sequence, not a change of any weight (an exported graph carries them as constants)")

    # ---- torch ------------------------------------------------------------------
    def inject(self, model: torch.nn.Module, config: Mapping[str, Any], adapter_name: str = "default",
               targets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        from adapterkit import attached

        from .prompt_module import CHILD, PromptTuning, embedding_path, init_prompt, prompt_tuning

        config = validate_config(config)
        _check_name(adapter_name)
        _check_model(model)
        path = embedding_path(model)
        embedding = model.get_submodule(path)
        shape = [int(d) for d in embedding.weight.shape]
        if targets is not None:
            _check_targets(targets, path, shape)
        container = prompt_tuning(model)
        if container is not None and adapter_name in container.embeddings:
            raise UsageError(f"the model already holds a prompt-tuning adapter named {adapter_name!r}",
                             hint="inject under another name", code="duplicate_adapter")
        keep = {id(p) for injected in attached(model).values() for p in injected.parameters()}
        for param in model.parameters():
            if id(param) not in keep:
                param.requires_grad_(False)
        prompt = init_prompt(embedding, config, config["num_virtual_tokens"])
        if container is None:
            container = PromptTuning(path)
            model.add_module(CHILD, container)
            container.attach(model)
        container.add(adapter_name, prompt)
        container.embeddings[adapter_name].requires_grad_(True)
        return {path: {"kind": KIND, "shape": shape}}

    def load_state(self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
        import torch

        params = _named_params(model, adapter_name)
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise TensorFileError(
                f"prompt-tuning tensors do not match the injected adapter {adapter_name!r}",
                expected=sorted(params), found=sorted(tensors),
                hint="a prompt adapter holds exactly <input embedding>.prompt.embeddings", code="tensor_mismatch",
            )
        with torch.no_grad():
            for key, param in params.items():
                if tuple(tensors[key].shape) != tuple(param.shape):
                    raise TensorFileError("prompt-tuning tensor has the wrong shape", location=key,
                                          expected=list(param.shape), found=list(tensors[key].shape), code="tensor_shape")
                param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))

    def extract_state(self, model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        return {key: param.detach().clone() for key, param in _named_params(model, adapter_name).items()}

    def trainable_parameters(self, model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
        return list(_named_params(model, adapter_name).values())

    def set_enabled(self, model: torch.nn.Module, enabled: bool) -> None:
        from .prompt_module import prompt_tuning

        container = prompt_tuning(model)
        if container is not None:
            container.enabled = enabled

    def unload(self, model: torch.nn.Module) -> torch.nn.Module:
        """Remove the prompts and the hooks; the model is the base again."""
        from adapterkit import attached, detach

        from .prompt_module import CHILD, prompt_tuning

        for name in [name for name, injected in attached(model).items() if injected.method.name == self.name]:
            detach(model, name)
        container = prompt_tuning(model)
        if container is not None:
            container.detach()
            delattr(model, CHILD)
        return model


# ---- torch helpers ------------------------------------------------------------------

def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise UsageError("adapter name must be a non-empty string without '.'", found=name, code="bad_name")


def _check_model(model: torch.nn.Module) -> None:
    from .virtual import _signature

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise UsageError(f"{type(model).__name__} is an encoder-decoder model; prompt tuning here covers "
                         "decoder-only and encoder-only models", code="bad_model")
    if "inputs_embeds" not in _signature(type(model).forward).parameters:
        raise UsageError(f"{type(model).__name__}.forward takes no inputs_embeds, which prompt tuning needs",
                         hint="use a transformers model that accepts inputs_embeds", code="bad_model")


def _check_targets(targets: Mapping[str, Mapping[str, Any]], path: str, shape: list[int]) -> None:
    hint = "apply the adapter to the base model it was made for"
    if list(targets) != [path]:
        raise BaseModelError("the adapter's embedding is not the model's input embedding", location="$.targets",
                             expected=[path], found=sorted(targets), hint=hint, code="missing_module")
    recorded = list(targets[path].get("shape", []))
    if recorded != shape:
        raise BaseModelError(f"module {path}: embedding shape differs from the adapter's", location=path,
                             expected=recorded, found=shape, hint=hint, code="shape_mismatch")


def _named_params(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    from .prompt_module import prompt_tuning

    container = prompt_tuning(model)
    if container is None or adapter_name not in container.embeddings:
        raise UsageError(f"the model holds no prompt-tuning adapter named {adapter_name!r}", code="unknown_adapter")
    return {f"{container.embedding_path}.{PromptTuningMethod.name}.{PARAM}": container.embeddings[adapter_name]}


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``prompt`` method (entry point ``prompt``)."""
    register(PromptTuningMethod())


@hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``PROMPT_TUNING`` codec (method ``prompt``)."""
    from .peft_codec import PromptTuningCodec

    register(PromptTuningCodec())
