"""QLoRA memory benchmark: bytes of the 4-bit base linear weights vs the float32 weights they replace.

Every layer the ``qlora`` method quantises (``quantize: "all-linear"``: every
linear layer but the output head) is quantised with bitsandbytes exactly as
``adapterkit.apply`` does (``adapterkit.plugins.lora.quant.quantize_module``).
For each setting the table gives the float32 bytes of those weights, the 4-bit
bytes (packed data + every tensor of the quant state: absmax, its second-level
statistics under double quantisation, the code tables and bitsandbytes'
serialised state header), their ratio, and the rounding the quantisation adds
(max |Q(W) - W| and the relative Frobenius error over all quantised weights).

Usage::

    python benchmarks/bench_qlora_memory.py            # SmolLM2-135M (adapterkit.core.demo.real_models)
    python benchmarks/bench_qlora_memory.py --base DIR # another local HF causal LM folder
    python benchmarks/bench_qlora_memory.py --tiny     # a small random llama (seconds; CI smoke)

Target (issue): 4-bit bytes <= 0.3x the float32 bytes with the default setting (NF4, double quantisation,
blocksize 64). The exit status is 1 when the default setting misses it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

TARGET_RATIO = 0.3
SETTINGS = [  # (label, qlora config); the first is the method's default
    ("nf4, double quant, block 64 (default)", {}),
    ("nf4, block 64", {"double_quant": False}),
    ("fp4, double quant, block 64", {"quant_type": "fp4"}),
    ("nf4, double quant, block 256", {"blocksize": 256}),
]
MIB = 1024 * 1024


def tiny_model() -> Any:
    """A random 2-layer llama, wide enough (256) that per-layer constants do not dominate."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def load_model(base: str | None) -> tuple[Any, str]:
    import torch
    from transformers import AutoModelForCausalLM

    if base is None:
        from adapterkit.core.demo.real_models import smollm2_path

        base, name = str(smollm2_path()), "SmolLM2-135M"
    else:
        name = base
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), name


def measure(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Quantise every layer the config quantises (one at a time, the model is not changed) and count bytes."""
    import torch

    from adapterkit.plugins.lora import quant
    from adapterkit.plugins.lora.layer import describe
    from adapterkit.plugins.lora.qlora import validate_qlora_config
    from adapterkit.plugins.lora.targeting import select_modules

    spec = quant.QuantSpec.from_config(validate_qlora_config(config))
    modules = select_modules(model, {"target_modules": "all-linear", "layers_to_transform": None})
    float_bytes = packed_bytes = state_bytes = 0
    max_abs = sq_diff = sq_norm = 0.0
    start = time.perf_counter()
    for module in modules.values():
        kind, _ = describe(module)
        weight = module.weight.detach().float()
        float_bytes += weight.numel() * 4
        q = quant.quantize_module(module, kind, spec)
        packed = q.weight.data.numel() * q.weight.data.element_size()
        packed_bytes += packed
        state_bytes += quant.quantized_bytes(q) - packed
        dense = weight.T if kind == "conv1d" else weight
        diff = (quant.dequantize(q).float() - dense).double()
        max_abs = max(max_abs, float(diff.abs().max()))
        sq_diff += float(diff.pow(2).sum())
        sq_norm += float(dense.double().pow(2).sum())
    seconds = time.perf_counter() - start
    params = {id(p): p for p in model.parameters()}
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    four_bit = packed_bytes + state_bytes
    return {
        "layers": len(modules), "float32_bytes": float_bytes, "packed_bytes": packed_bytes, "state_bytes": state_bytes,
        "four_bit_bytes": four_bit, "ratio": four_bit / float_bytes, "max_abs_error": max_abs,
        "relative_fro_error": (sq_diff / sq_norm) ** 0.5, "seconds": seconds,
        "model_float32_bytes": model_bytes, "model_with_4bit_bytes": model_bytes - float_bytes + four_bit,
        "torch_threads": torch.get_num_threads(),
    }


def table(name: str, rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [
        f"### QLoRA base memory: {name} ({rows[0][1]['layers']} linear layers quantised, head excluded)",
        "",
        "| setting | float32 MiB | 4-bit MiB (data + state) | ratio | max abs(Q(W)-W) | rel. error (Frobenius) | s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['float32_bytes'] / MIB:.2f} | {r['four_bit_bytes'] / MIB:.2f} "
            f"({r['packed_bytes'] / MIB:.2f} + {r['state_bytes'] / MIB:.3f}) | **{r['ratio']:.3f}x** "
            f"| {r['max_abs_error']:.3g} | {r['relative_fro_error']:.2%} | {r['seconds']:.1f} |"
        )
    first = rows[0][1]
    lines += [
        "",
        f"Whole model (embeddings, norms and head stay float32): {first['model_float32_bytes'] / MIB:.1f} MiB -> "
        f"{first['model_with_4bit_bytes'] / MIB:.1f} MiB "
        f"({first['model_with_4bit_bytes'] / first['model_float32_bytes']:.3f}x) with the default setting. "
        f"Target: 4-bit linear weights <= {TARGET_RATIO}x their float32 bytes.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small random llama instead of SmolLM2 (smoke mode)")
    parser.add_argument("--base", help="a local Hugging Face causal LM folder instead of SmolLM2")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON after the table")
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    if args.tiny:
        model, name = tiny_model(), "tiny random llama (hidden 256)"
    else:
        model, name = load_model(args.base)
    settings = SETTINGS[:2] if args.tiny else SETTINGS
    rows = [(label, measure(model, config)) for label, config in settings]
    print(table(name, rows))
    if args.json:
        print(json.dumps({"model": name, "results": {label: r for label, r in rows}}, indent=2, sort_keys=True))
    ok = rows[0][1]["ratio"] <= TARGET_RATIO
    if not ok:
        print(f"FAIL: default ratio {rows[0][1]['ratio']:.3f} > {TARGET_RATIO}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
