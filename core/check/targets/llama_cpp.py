"""llama.cpp's load plan. Rules read from the llama.cpp vendored in llama-cpp-python 0.3.36
(``convert_lora_to_gguf.py``, ``conversion/{base,llama,qwen,gemma}.py``, ``src/llama-adapter.cpp``).

llama.cpp loads a GGUF LoRA: adapterkit's ``convert --to gguf`` (the same writer as a dry run
here) maps every module to the base's tensor name (``blk.N.attn_q``, ``ffn_gate``, ``output``,
...), permutes the q / k rows of B for Llama and Mistral, and folds per-module scales into B
under one global ``adapter.lora.alpha`` (llama.cpp reads the rank per tensor, the alpha once), so
per-module ranks, alphas and rsLoRA are applied exactly. What the writer refuses (an architecture
it does not map, a module with no tensor in the base, ...) llama.cpp's converter refuses too.

The loader refuses a LoRA tensor whose base tensor the model lacks ("does not exist in base
model"): an ``lm_head`` adapter on a base whose head is tied to the input embeddings (its GGUF
holds no ``output.weight``) fails (inferred from the loader and converter code; not run).
"""

from __future__ import annotations

from adapterkit.core.errors import AdapterkitError

from .common import Context, leaf, writer_refusal
from .plan import UNKNOWN, UNSUPPORTED, Plan

NAME = "llama.cpp"
VERSION = "0.3.36"
RULES = "llama-cpp-python 0.3.36's vendor/llama.cpp: convert_lora_to_gguf.py, conversion/*.py, src/llama-adapter.cpp"


def plan(ctx: Context) -> Plan:
    result = Plan(NAME, f"llama.cpp (llama-cpp-python {VERSION})", VERSION, RULES, "gguf", modules=ctx.modules(lambda m: None),
                  flags=["--lora ADAPTER.gguf"], usage="llama-cli -m BASE.gguf --lora ADAPTER.gguf")
    if ctx.version is not None:
        result.notes.append(f"release {'.'.join(map(str, ctx.version))} (the rules are llama-cpp-python {VERSION}'s "
                            "vendored llama.cpp)")
    if ctx.refuse_without_factors(result, "llama.cpp"):
        return result
    if ctx.refuse_stacked(result, "does not take LoRA on fused expert parameters: convert_lora_to_gguf.py stops "
                                  "with 'Unprocessed experts' on PEFT's target_parameters keys"):
        return result
    if ctx.base is None:
        for item in result.modules:
            item.status, item.reason = UNKNOWN, "llama.cpp's tensor names depend on the base's architecture"
        result.notes.append("architecture and tensor names (pass --base)")
        return result
    problem = ctx.dry_run("gguf")
    if ctx.report.format != "gguf":
        result.steps.extend(ctx.steps("gguf", f"adapterkit convert {ctx.path} ADAPTER.gguf --to gguf --base BASE"))
    result.steps.append("convert the base with llama.cpp's convert_hf_to_gguf.py (without --fuse-qkv)")
    names = _names(ctx)
    for item in result.modules:
        item.runtime_module = names.get(item.module)
        if names and item.runtime_module is None:
            item.status, item.code = UNSUPPORTED, "llama_cpp_modules"
            item.reason = f"llama.cpp's converter maps no base tensor to {item.module} ('Can not map tensor')"
        elif leaf(item.module) == "lm_head" and ctx.tied_head:
            item.status, item.code = UNSUPPORTED, "llama_cpp_tied_head"
            item.reason = ("the base ties its head to the input embeddings, so its GGUF has no output.weight and "
                           "llama.cpp refuses the head's LoRA ('does not exist in base model')")
            item.hint = "merge the adapter into the base instead (adapterkit merge unties the head)"
    if problem is not None:
        writer_refusal(result, problem, "gguf")
    return result


def _names(ctx: Context) -> dict[str, str]:
    try:
        return ctx.registry.format("gguf").module_names(ctx.adapter, base=ctx.base)
    except AdapterkitError:  # the dry run above reported the writer's refusals
        return {}

