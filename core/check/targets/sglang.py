"""SGLang's load plan. Rules read from SGLang 0.5.23 (``srt/lora/{lora,lora_config,lora_manager,mem_pool,utils}.py``).

- Files: a PEFT folder (``peft_type`` LORA). The config is read for ``target_modules``, ``r``,
  ``lora_alpha`` and ``use_dora`` only: **one scale** ``lora_alpha / r`` for the whole adapter.
  ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` are never read, so a module whose scale
  differs is served wrong, and a module whose rank differs from ``r`` fails the buffer's shape
  assertion. ``target_modules`` must be a list, or ``"all"`` / ``"all-linear"``; another string
  (adapterkit's writer writes an exact regex for a partial selection) raises ``ValueError``.
- Weights are grouped by layer index (the ``layers.N`` in the name) and normalised: ``q_proj`` +
  ``k_proj`` (zero-filled when absent) + ``v_proj`` into ``qkv_proj``, ``gate_proj`` + ``up_proj``
  (zero-filled) into ``gate_up_proj``. q alone or q + k fails at load (``KeyError`` on v_proj);
  k / v without q, or up without gate, keep their names and fail when first used ("Cannot find
  target module name").
- ``embed_tokens`` / ``lm_head`` are loaded only when named in the adapter's ``target_modules``
  (or ``all``); otherwise skipped with a debug log: dropped silently.
- DoRA is refused; a rank above ``--max-lora-rank``, or modules outside ``--lora-target-modules``,
  are refused for an adapter loaded after startup (both are inferred from the startup adapters).
"""

from __future__ import annotations

from typing import Any

from .common import Context, leaf, same_scale, scale_of, sibling
from .plan import APPLIED, DROPPED, UNSUPPORTED, WRONG, Plan, Refusal

NAME = "sglang"
VERSION = "0.5.23"
RULES = "srt/lora/{lora,lora_config,lora_manager,mem_pool,utils}.py, srt/arg_groups/fields/lora.py"
#: --lora-target-modules choices: the module names SGLang has LoRA buffers for
KNOWN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj",
                   "wq_b", "wk", "weights_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
                   "embed_tokens", "lm_head", "qkvr", "wo_ud"})
EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
NORMALISED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}


def plan(ctx: Context) -> Plan:
    result = Plan(NAME, f"SGLang {VERSION}", VERSION, RULES, "peft", modules=ctx.modules(_runtime_module),
                  usage="python -m sglang.launch_server --model-path BASE --lora-paths NAME=PATH")
    ctx.note_release(result, VERSION, f"SGLang {VERSION}")
    if ctx.refuse_without_factors(result, "SGLang"):
        return result
    if ctx.refuse_stacked(result, "has no LoRA on fused expert parameters: it drops PEFT's target_parameters keys "
                                  "silently (and fails under --lora-strict-loading)"):
        return result
    config, problem = ctx.peft_config()
    if ctx.report.format != "peft" or ctx.lowered_for("peft"):
        result.steps.extend(ctx.steps("peft", f"adapterkit convert {ctx.path} OUT --to peft"))
    if problem is not None:
        result.refusals.append(Refusal(f"SGLang reads PEFT folders, and this adapter cannot be written as one: "
                                       f"{problem.message}", "sglang_format", problem.location, problem.found,
                                       problem.hint))
        return result
    assert config is not None
    targeted = _targets(result, config, ctx)
    _groups(result)
    for item in result.modules:
        name = leaf(item.module)
        if item.status != APPLIED:
            continue
        if name not in KNOWN:
            item.status, item.code = UNSUPPORTED, "sglang_modules"
            item.reason = (f"SGLang has no LoRA buffers for {name}: its weights are skipped with a warning and fail "
                           "when first used (refused at load with --lora-strict-loading)")
        elif name in EMBEDDINGS and targeted is not None and name not in targeted:
            item.status, item.code = DROPPED, "sglang_dropped"
            item.reason = f"SGLang loads {name} weights only when target_modules names {name}; skipped silently"
            item.hint = f"add {name!r} to target_modules in adapter_config.json"
    _scales(result, ctx, config)
    _flags(result)
    return result


def _runtime_module(module: str) -> str:
    name = leaf(module)
    if name in NORMALISED:
        return sibling(module, NORMALISED[name]) + f"[{name.removesuffix('_proj')}]"
    return module


def _targets(result: Plan, config: dict[str, Any], ctx: Context) -> set[str] | None:
    """The normalised target names (None: "all"); a target_modules SGLang refuses is a refusal."""
    value = config.get("target_modules")
    if config.get("peft_type", "LORA").upper() != "LORA":
        result.refusals.append(Refusal("SGLang serves peft_type LORA only", "sglang_config", "$.peft_type",
                                       config.get("peft_type")))
    if isinstance(value, str):
        if value in ("all", "all-linear"):
            return None
        needed = sorted({leaf(m) for m in ctx.adapter.targets})
        result.refusals.append(Refusal(
            "SGLang takes target_modules as a list of module names (or all / all-linear); a regex string raises "
            "ValueError", "sglang_target_modules", "$.target_modules", value,
            f"set target_modules to {needed} in adapter_config.json (SGLang applies the tensors the file holds)"))
        return set()
    if isinstance(value, list):
        return {leaf(str(v)) for v in value}
    result.refusals.append(Refusal("SGLang needs target_modules in adapter_config.json (a list of module names)",
                                   "sglang_target_modules", "$.target_modules", value))
    return set()


def _groups(result: Plan) -> None:
    """q / k / v and gate / up of one layer are loaded together; some subsets fail."""
    by_layer: dict[tuple[str, str], dict[str, Any]] = {}
    for item in result.modules:
        name = leaf(item.module)
        if name in NORMALISED:
            by_layer.setdefault((item.module.rpartition(".")[0], NORMALISED[name]), {})[name] = item
    for (_, packed), members in by_layer.items():
        present = set(members)
        if packed == "qkv_proj":
            if "q_proj" in present and "v_proj" not in present:
                reason = "q_proj without v_proj in a layer fails SGLang's load (KeyError on v_proj while packing qkv_proj)"
            elif "q_proj" not in present:
                reason = ("k_proj / v_proj without q_proj in a layer keep their names and fail when first used "
                          "('Cannot find target module name')")
            else:
                continue
        else:
            if "gate_proj" in present:
                continue
            reason = "up_proj without gate_proj keeps its name and fails when first used ('Cannot find target module name')"
        for item in members.values():
            item.status, item.code, item.reason = UNSUPPORTED, "sglang_packing", reason
            item.hint = "give the layer's q and v projections (gate for up) an adapter too, zero-initialised B"


def _scales(result: Plan, ctx: Context, config: dict[str, Any]) -> None:
    r, alpha = config.get("r"), config.get("lora_alpha")
    scale = scale_of({"r": r, "lora_alpha": alpha})  # SGLang: lora_alpha / r, use_rslora ignored
    if scale is None or ctx.factors is None:
        return
    for item in result.modules:
        if item.status != APPLIED:
            continue
        if item.rank != r:
            item.status, item.code = UNSUPPORTED, "sglang_rank"
            item.reason = (f"SGLang slices every module's buffer to the config's r = {r}: a module of another rank "
                           "fails its shape assertion (rank_pattern is not read)")
            item.hint = "write every module with one rank (zero-pad the smaller ones)"
        elif not same_scale(ctx.factors[item.module].scale, scale):
            item.status, item.code = WRONG, "sglang_scales"
            item.reason = (f"SGLang applies one scale lora_alpha / r = {scale:g} to every module (it reads neither "
                           "alpha_pattern nor use_rslora); these modules' scales differ")
            item.hint = "fold each module's scale into its B and write one lora_alpha / r, or merge the adapter"


def _flags(result: Plan) -> None:
    applied = [m for m in result.modules if m.status == APPLIED]
    ranks = [m.rank for m in applied if m.rank]
    if ranks:
        result.flags.append(f"--max-lora-rank {max(ranks)}")
    names = sorted({NORMALISED.get(leaf(m.module), leaf(m.module)) for m in applied})
    if names:
        result.flags.append("--lora-target-modules " + " ".join(names))
