"""mlx-lm's load plan. Rules read from mlx-lm 0.32.2 (``tuner/utils.py`` ``load_adapters`` /
``linear_to_lora_layers``, ``tuner/lora.py``, ``tuner/dora.py``).

mlx-lm wraps the modules its ``adapter_config.json`` names (``lora_parameters.keys``, in the last
``num_layers`` blocks, and model-level paths such as ``lm_head``) with one rank and one scale for
the whole adapter, and refuses any tensor that is not such a wrapper's ``lora_a`` / ``lora_b`` of
the same shape ("contains incompatible tensors"). adapterkit's ``convert --to mlx`` (dry-run here)
zero-pads every module to the largest rank and folds each module's scale into B, so per-module
ranks, alphas and rsLoRA are applied exactly; it refuses embeddings and modules in more than one
list of blocks. Parameter paths are the model's attribute paths, the Hugging Face paths for the
Llama-family models (Llama, Mistral, Qwen 2 / 3, Gemma); for others they are not known here.
A tied base has no ``lm_head`` module in mlx-lm (its head is the embedding), so an ``lm_head``
adapter is refused (inferred from mlx-lm's model code; not run).
"""

from __future__ import annotations

from .common import Context, leaf, unknown_architecture, writer_refusal
from .plan import APPLIED, UNSUPPORTED, Plan

NAME = "mlx"
VERSION = "0.32.2"
RULES = "mlx-lm 0.32.2: tuner/utils.py (load_adapters, linear_to_lora_layers), tuner/lora.py, tuner/dora.py"
#: architectures whose mlx-lm attribute paths are the Hugging Face module paths
ARCHES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                    "GemmaForCausalLM", "Gemma2ForCausalLM"})


def plan(ctx: Context) -> Plan:
    result = Plan(NAME, f"mlx-lm {VERSION}", VERSION, RULES, "mlx", modules=ctx.modules(),
                  flags=["--adapter-path PATH"], usage="mlx_lm.generate --model BASE --adapter-path PATH")
    ctx.note_release(result, VERSION, f"mlx-lm {VERSION}")
    if ctx.refuse_without_factors(result, "adapterkit's mlx-lm writer"):
        return result
    if ctx.refuse_stacked(result, "is not written for LoRA on fused expert parameters by adapterkit's mlx-lm writer "
                                  "(mlx-lm's LoRASwitchLinear form is not built)"):
        return result
    problem = ctx.dry_run("mlx")
    if ctx.report.format != "mlx":
        result.steps.extend(ctx.steps("mlx", f"adapterkit convert {ctx.path} OUT --to mlx"
                                      + (" --base BASE" if ctx.base else "")))
    arch = ctx.architecture
    if arch not in ARCHES:
        unknown_architecture(result, arch, "mlx-lm's module paths")
    for item in result.modules:
        if item.status == APPLIED and leaf(item.module) == "lm_head" and ctx.tied_head:
            item.status, item.code = UNSUPPORTED, "mlx_tied_head"
            item.reason = ("mlx-lm builds no lm_head for a base whose head is tied to the embeddings, so it refuses "
                           "the head's tensors ('not an adapter parameter in the model'; inferred)")
            item.hint = "merge the adapter into the base instead"
    if problem is not None:
        writer_refusal(result, problem, "mlx")
    return result
