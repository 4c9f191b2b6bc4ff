"""adapterkit.core.format: the data model and its files: adapter, manifest, tensor files, base-model headers, composition blocks."""
