"""adapterkit.core.export: ONNX export: tracing, swappable LoRA inputs, the export folder."""
