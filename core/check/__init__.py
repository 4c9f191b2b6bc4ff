"""adapterkit.core.check: validation: validate, inspect, the runtime targets."""
