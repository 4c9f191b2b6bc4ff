"""adapterkit.core.bench: measurements of an adapter: sizes, load, latency, training step, the report."""
