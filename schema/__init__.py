"""The machine-readable JSON Schemas of the adapterkit manifest, one per major version."""
