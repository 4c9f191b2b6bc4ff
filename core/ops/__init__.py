"""adapterkit.core.ops: adapters combined and folded: merge into the base, compose."""
