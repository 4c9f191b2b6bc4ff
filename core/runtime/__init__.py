"""adapterkit.core.runtime: adapters in a live torch model: inject, apply, runtime composition, the adapter pool."""
