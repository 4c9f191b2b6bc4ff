"""Shared bits of the adapterkit-adalora tests (a unique module name: pytest runs every package's tests at once)."""

from __future__ import annotations

from typing import Any

#: adapterkit configs: small ranks, a full schedule, every field PEFT-named
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "init_r": 4, "target_r": 2, "lora_alpha": 8,
              "total_step": 10},
    "gpt2": {"target_modules": ["c_attn", "c_fc"], "init_r": 4, "target_r": 2, "lora_alpha": 16, "total_step": 10},
    "bert": {"target_modules": ["query", "value"], "init_r": 3, "target_r": 1, "lora_alpha": 4, "total_step": 10},
}


def peft_config(kind: str, **extra: Any) -> Any:
    """PEFT's AdaLoraConfig for the same modules and values as CONFIGS[kind]."""
    import peft

    fields = {**CONFIGS[kind], **extra}
    return peft.AdaLoraConfig(**fields, task_type="CAUSAL_LM" if kind != "bert" else None)


def prune(peft_model: Any, seed: int) -> dict[str, list[bool]]:
    """Mask E of a PEFT AdaLoRA model and set its rank_pattern as PEFT's ``RankAllocator.mask_to_budget`` does
    (keys ``<module>.lora_E.default``; one module pruned to rank 0, others to various ranks)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pattern = {}
    names = [n for n, _ in peft_model.base_model.model.named_parameters() if "lora_E.default" in n]
    with torch.no_grad():
        for i, (name, param) in enumerate(peft_model.base_model.model.named_parameters()):
            if "lora_E.default" not in name:
                continue
            index = names.index(name)
            keep = torch.rand(param.shape[0], generator=gen) > 0.5
            if index == 0:
                keep[:] = False  # a module pruned to rank 0
            elif index == 1:
                keep[:] = True  # a module kept whole
            param.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[name] = keep.tolist()
    peft_model.peft_config["default"].rank_pattern = pattern
    return pattern
