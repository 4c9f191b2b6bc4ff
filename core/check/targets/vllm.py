"""vLLM's load plan. Rules read from vLLM 0.34.0 (the newest release), with the history back to 0.10.

- Files: a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``); another format is
  served after ``adapterkit convert --to peft``, so the config checked is the one that writes.
- ``vllm/lora/peft_helper.py`` (``PEFTHelper.validate_legal``) refuses ``modules_to_save`` (language
  models), ``bias`` other than ``none``, ``use_dora``, and from 0.32 ``lora_bias``, the PiSSA / OLoRA /
  CorDA / LoftQ init strings, aLoRA, ``layer_replication``, BD-LoRA and QALoRA; a rank (``r`` and every
  ``rank_pattern`` value) above ``--max-lora-rank`` (1, 8, 16, 32, 64, 128, 256, 320 or 512, default
  16; no 1 before 0.12).
- Scales: from **0.32** ``get_rank_and_scaling`` gives every module its own rank and scale from
  ``rank_pattern`` / ``alpha_pattern`` (PEFT >= 0.15's matching, which adapterkit's reader and
  writer follow); **0.10 to 0.31** apply the config's one ``lora_alpha / r`` (or ``/ sqrt(r)``) to
  every module, so a module with another scale is served wrong.
- Modules (``lora_model.check_unexpected_modules``, the model classes' ``packed_modules_mapping``
  and ``embedding_modules``): ``q/k/v_proj`` are packed into ``qkv_proj`` and ``gate/up_proj`` into
  ``gate_up_proj`` (any subset: a missing slice stays zero); ``o_proj``, ``down_proj``; ``lm_head``
  and ``embed_tokens`` where the class lists them (Llama, Qwen3; not Qwen2, Mistral, Gemma 2/3).
  Any other module name refuses the adapter ("expected target modules in ..."). Only the last name
  component is checked: a module whose path the model lacks loads and is never used (the silent
  drop of vllm#34186).
"""

from __future__ import annotations

from typing import Any

from .common import Context, leaf, same_scale, scale_of, sibling, unknown_architecture
from .plan import APPLIED, DROPPED, UNKNOWN, UNSUPPORTED, WRONG, Plan, Refusal

NAME = "vllm"
VERSION = "0.34.0"
RULES = ("vllm/lora/peft_helper.py, lora_model.py, utils.py, worker_manager.py, config/lora.py; "
         "model_executor/models/{llama,qwen2,qwen3,gemma2,gemma3,mistral,registry}.py")
#: --max-lora-rank values (vllm/config/lora.py MaxLoRARanks) and the default
MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_RANKS_BEFORE_0_12 = (8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_RANK = 16
#: patterns are applied per module from this release on
PATTERNS_FROM = (0, 32)
OLDEST_READ = (0, 10)
#: largest vocabulary LogitsProcessorWithLoRA takes
MAX_LM_HEAD_VOCAB = 258048
PACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
          "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
PLAIN = frozenset({"o_proj", "down_proj"})
#: model class -> the embedding_modules vLLM adapts beside the linear layers
ARCHES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": frozenset({"embed_tokens", "lm_head"}),
    "Qwen3ForCausalLM": frozenset({"embed_tokens", "lm_head"}),
    "Qwen2ForCausalLM": frozenset(),
    "MistralForCausalLM": frozenset(),  # "We don't support LoRA on the embedding layers"
    "Gemma2ForCausalLM": frozenset(),
    "Gemma3ForCausalLM": frozenset(),
    "GemmaForCausalLM": frozenset({"embed_tokens"}),  # the Transformers backend in 0.34
}
#: vLLM model classes with ``is_3d_moe_weight = True``: their fused-MoE LoRA reads PEFT's 3-d expert layout
MOE_3D_CLASSES = frozenset({"GptOssForCausalLM", "Qwen3_5MoeForConditionalGeneration",
                            "Qwen3VLMoeForConditionalGeneration", "Glm4MoeLiteForCausalLM",
                            "InternS1ProForConditionalGeneration"})
INIT_STRINGS = ("pissa", "olora", "corda", "loftq")  # init_lora_weights values that change the base
REFUSED_FROM_0_32 = {"alora_invocation_tokens": "aLoRA", "layer_replication": "layer replication",
                     "use_bdlora": "BD-LoRA", "use_qalora": "QALoRA"}


def runtime_module(module: str) -> str:
    name = leaf(module)
    if name in PACKED:
        packed, part = PACKED[name]
        return f"{sibling(module, packed)}[{part}]"
    return module


def plan(ctx: Context) -> Plan:
    version = ctx.version or tuple(int(p) for p in VERSION.split("."))
    text = ".".join(map(str, version))
    result = Plan(NAME, f"vLLM {text}", text, RULES, "peft", modules=ctx.modules(runtime_module),
                  usage="vllm serve BASE --enable-lora --lora-modules NAME=PATH")
    if version < OLDEST_READ:
        result.notes.append(f"releases before 0.10 (the rules go back to 0.10.0; {text} asked)")
    if ctx.refuse_without_factors(result, "vLLM"):
        return result
    config, problem = ctx.peft_config()
    if problem is not None:
        result.refusals.append(Refusal(f"vLLM reads PEFT folders, and this adapter cannot be written as one: "
                                       f"{problem.message}", "vllm_format", problem.location, problem.found,
                                       problem.hint))
    elif config is not None:
        _config_rules(result, config, version)
    if ctx.stacked and not _experts(result, ctx, config):
        return result
    if ctx.report.format != "peft" or ctx.lowered_for("peft"):
        result.steps.extend(ctx.steps("peft", f"adapterkit convert {ctx.path} OUT --to peft"))
        result.warnings.append(Refusal("vLLM loads PEFT folders (adapter_config.json + adapter_model.safetensors)",
                                       "vllm_format", found=ctx.report.format,
                                       hint=f"adapterkit convert {ctx.path} OUT --to peft"))
    _modules(result, ctx)
    if version < PATTERNS_FROM and config is not None:
        _one_scale(result, ctx, config, text)
    _rank(result, ctx, version)
    result.flags.insert(0, "--enable-lora")
    return result


def _config_rules(result: Plan, config: dict[str, Any], version: tuple[int, ...]) -> None:
    def refuse(message: str, code: str, key: str, hint: str | None = None) -> None:
        result.refusals.append(Refusal(message, code, f"$.{key}", config.get(key), hint))

    if config.get("modules_to_save"):
        refuse("vLLM only supports modules_to_save being None for language models", "vllm_modules_to_save",
               "modules_to_save", "merge the adapter into the base (the saved modules are full weights)")
    if config.get("bias", "none") not in (None, "none"):
        refuse("vLLM refuses adapter biases ('Adapter bias is not supported')", "vllm_bias", "bias")
    if config.get("use_dora"):
        refuse("vLLM does not support DoRA", "vllm_dora", "use_dora", "merge the adapter into the base")
    if version >= PATTERNS_FROM:
        if config.get("lora_bias"):
            refuse("vLLM does not support LoRA bias (lora_bias)", "vllm_bias", "lora_bias")
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(INIT_STRINGS):
            refuse(f"vLLM refuses init_lora_weights={init!r}: such inits change the base weights", "vllm_init",
                   "init_lora_weights", "merge the adapter into its residualised base")
        for key, what in REFUSED_FROM_0_32.items():
            if config.get(key):
                refuse(f"vLLM refuses {what} adapters ({key})", "vllm_config", key)


def _modules(result: Plan, ctx: Context) -> None:
    arch = ctx.architecture
    embeddings = ARCHES.get(arch or "")
    if embeddings is None:
        unknown_architecture(result, arch, "the modules vLLM adapts")
        return
    vocab = (ctx.base_info.config.get("vocab_size") if ctx.base_info is not None else None)
    for item in result.modules:
        name = leaf(item.module)
        if item.module in ctx.stacked:
            continue  # the experts' own rules (_experts)
        if name not in PACKED and name not in PLAIN and name not in embeddings:
            item.status, item.code = UNSUPPORTED, "vllm_modules"
            item.reason = (f"vLLM does not adapt {name} of {arch}: it refuses the adapter ('expected target modules "
                           f"in {sorted(set(PACKED) | PLAIN | embeddings)}')")
            item.hint = "drop these modules from the adapter, or merge the adapter into the base"
        elif name == "lm_head" and isinstance(vocab, int) and vocab > MAX_LM_HEAD_VOCAB:
            item.status, item.code = UNSUPPORTED, "vllm_modules"
            item.reason = f"vLLM's LoRA on lm_head takes a vocabulary of at most {MAX_LM_HEAD_VOCAB} ({vocab} here)"
        elif ctx.resolves(item.module) is False:
            item.status, item.code = DROPPED, "vllm_dropped"
            item.reason = (f"vLLM checks only the last name component ({name}) and finds modules by path, which "
                           "the base lacks: the tensors load and are never used (vllm#34186)")
            item.hint = "rename the adapter's modules to the base's paths (validate --base names the closest)"


def _experts(result: Plan, ctx: Context, config: dict[str, Any] | None) -> bool:
    """vLLM's fused-MoE LoRA (lora/model_manager.py, lora_model.py) for stacked expert parameters; False when
    the adapter is refused. The experts module takes gate_up_proj and down_proj together, under the config's
    one lora_alpha / r; a model class with ``is_3d_moe_weight`` reads PEFT's 3-d layout as it is, others only
    with the mixed MoE LoRA format switched on."""
    missing = sorted(m for m in ctx.stacked if ctx.factors is None or ctx.factors.get(m) is None)
    if missing:
        result.refusals.append(Refusal("the method gives no per-expert factors for a stacked parameter (stacked_factors)",
                                       "vllm_method", f"$.targets[{missing[0]!r}]", missing,
                                       "merge the adapter into the base (adapterkit merge)"))
        result.refuse_all("no per-expert factors", "vllm_method", reported=False)
        return False
    by_module: dict[str, set[str]] = {}
    for name in ctx.stacked:
        module, _, part = name.rpartition(".")
        by_module.setdefault(module, set()).add(part)
    for item in result.modules:
        if item.module in ctx.stacked:
            item.runtime_module = f"{item.module.rpartition('.')[0]} (FusedMoE)"
    lone = sorted(m for m, parts in by_module.items() if parts != {"gate_up_proj", "down_proj"})
    if lone:
        result.refusals.append(Refusal(
            "vLLM's fused-MoE LoRA loads gate_up_proj and down_proj together: an experts module with only one of "
            "them fails to load", "vllm_experts", f"$.targets[{sorted(ctx.stacked)[0]!r}]", sorted(by_module[lone[0]]),
            "train LoRA on both expert parameters, or merge the adapter into the base"))
        result.refuse_all("the adapter is refused (an experts module with one of its two parameters)",
                          "vllm_experts", reported=False)
        return False
    scale = scale_of(config) if config is not None else None
    for item in result.modules:
        found = ctx.factors.get(item.module) if ctx.factors is not None else None
        if item.module in ctx.stacked and scale is not None and found is not None \
                and not same_scale(found.scale, scale):
            item.status, item.code = WRONG, "vllm_scales"
            item.reason = (f"vLLM's fused-MoE LoRA applies the config's one scale lora_alpha / r = {scale:g} to the "
                           "experts (no rank_pattern / alpha_pattern there); these expert parameters' scales differ")
            item.hint = "give the expert parameters the config's alpha / r, or merge the adapter into the base"
    arch = ctx.architecture
    if arch in MOE_3D_CLASSES:
        ctx.report.checks.append(f"vLLM: {arch} serves the {len(ctx.stacked)} expert LoRA parameters as PEFT stores "
                                 "them (FusedMoE3DWithLoRA)")
    else:
        result.flags.append("--enable-mixed-moe-lora-format")
        result.warnings.append(Refusal(
            f"vLLM serves these {len(ctx.stacked)} expert LoRA parameters only with the mixed MoE LoRA format: "
            f"{arch or 'this model'}'s vLLM class reads per-expert 2-d LoRA, and without "
            "enable_mixed_moe_lora_format=True and LoRARequest(..., is_3d_lora_weight=True) the experts' update is "
            "not applied (the model behaves like the base there)", "vllm_experts",
            f"$.targets[{sorted(ctx.stacked)[0]!r}]", None,
            "start vLLM with --enable-mixed-moe-lora-format and send is_3d_lora_weight=True, or merge the adapter "
            "into the base (adapterkit merge)"))
    return True


def _one_scale(result: Plan, ctx: Context, config: dict[str, Any], text: str) -> None:
    """vLLM before 0.32 applies the config's one lora_alpha / r to every module."""
    scale = scale_of(config)
    if scale is None or ctx.factors is None:
        return
    for item in result.modules:
        own = ctx.factors[item.module].scale
        if item.status in (APPLIED, UNKNOWN) and not same_scale(own, scale):
            item.status, item.code = WRONG, "vllm_scales"
            item.reason = (f"vLLM {text} applies the config's one scale lora_alpha / r = {scale:g} to every module "
                           "(it drops rank_pattern and alpha_pattern before 0.32); these modules' scales differ")
            item.hint = "serve with vLLM >= 0.32, give every module the same alpha / r, or merge the adapter"


def _rank(result: Plan, ctx: Context, version: tuple[int, ...]) -> None:
    ranks = {item.module: item.rank for item in result.modules if item.rank}
    if not ranks:
        return
    allowed = MAX_RANKS if version >= (0, 12) else MAX_RANKS_BEFORE_0_12
    top = max(ranks.values())
    needed = next((r for r in allowed if r >= top), None)
    if needed is None:
        for item in result.modules:
            if item.rank and item.rank > allowed[-1]:
                item.status, item.code = UNSUPPORTED, "vllm_rank"
                item.reason = f"rank {item.rank} is above vLLM's largest --max-lora-rank ({allowed[-1]})"
                item.hint = "compose --strategy svd --rank N lowers the rank (approximately), or merge the adapter"
        return
    if needed > DEFAULT_MAX_RANK:
        result.flags.append(f"--max-lora-rank {needed}")
        where = max(ranks, key=lambda m: ranks[m] or 0)
        result.warnings.append(Refusal(
            f"rank {top} is above vLLM's default --max-lora-rank {DEFAULT_MAX_RANK}: vLLM refuses it unless started "
            f"with --max-lora-rank {needed}", "vllm_rank_flag", where, top,
            f"serve with: vllm serve BASE --enable-lora --max-lora-rank {needed}"))
        result.usage = f"vllm serve BASE --enable-lora --max-lora-rank {needed} --lora-modules NAME=PATH"
