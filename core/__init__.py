"""adapterkit.core: manifest, tensor layout, plugin registry, errors and safe I/O."""
