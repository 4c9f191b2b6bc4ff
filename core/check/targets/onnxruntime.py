"""ONNX Runtime's load plan. Rules from ONNX Runtime 1.32.0 (``AdapterFormat``, ``LoraAdapter``,
``RunOptions.add_active_adapter``, run here) and Olive 0.13.0 (``convert_adapters``, read).

An ``.onnx_adapter`` file feeds named tensors to a model's inputs: each module's
``<module>.lora_A.weight`` ``[in, r]`` and ``lora_B.weight`` ``[r, out]`` (the scale folded into B;
adapterkit's writer folds every module's own scale, where Olive's converter applies one
``lora_alpha / r`` to all). The runtime modules are the model's graph inputs: a parameter without
one is refused ("Invalid input name"), an input the adapter lacks keeps its empty default (no
update), a dtype other than the graph's is refused. ``adapterkit export onnx --mode swappable``
makes a model whose inputs are exactly the adapter's modules; ``adapterkit export check`` checks
an adapter file against an export folder.
"""

from __future__ import annotations

from .common import Context, writer_refusal
from .plan import Plan

NAME = "onnxruntime"
VERSION = "1.32.0"
RULES = "onnxruntime 1.32.0 (AdapterFormat, LoraAdapter, RunOptions.add_active_adapter); Olive 0.13.0 convert_adapters"


def plan(ctx: Context) -> Plan:
    result = Plan(NAME, f"ONNX Runtime {VERSION}", VERSION, RULES, "onnx-adapter",
                  modules=ctx.modules(lambda m: f"{m}.lora_A.weight, {m}.lora_B.weight (graph inputs)"),
                  usage="run_options.add_active_adapter(onnxruntime.LoraAdapter() loaded from ADAPTER.onnx_adapter)")
    ctx.note_release(result, VERSION, f"ONNX Runtime {VERSION}")
    if ctx.refuse_without_factors(result, "ONNX Runtime (.onnx_adapter: lora_A / lora_B pairs)",
                                  hint="export it merged instead: adapterkit export onnx ADAPTER --base BASE -o OUT "
                                       "--mode merged"):
        return result
    if ctx.refuse_stacked(result, "holds one lora_A / lora_B pair per module, not one per expert of a fused "
                                  "parameter"):
        return result
    problem = ctx.dry_run("onnx-adapter")
    if ctx.report.format != "onnx-adapter":
        result.steps.extend(ctx.steps("onnx-adapter",
                                      f"adapterkit convert {ctx.path} ADAPTER.onnx_adapter --to onnx-adapter"))
    result.steps.append("adapterkit export onnx ADAPTER --base BASE -o OUT --mode swappable (inputs for every module)")
    if problem is not None:
        writer_refusal(result, problem, "onnx-adapter")
    result.notes.append("which factor inputs the ONNX model has (an adapter module without one is refused: "
                        "'Invalid input name'; adapterkit export check compares a file with an export folder)")
    return result
