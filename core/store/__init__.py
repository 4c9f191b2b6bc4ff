"""adapterkit.core.store: adapters in and out of files: load, save, convert, the native format, composition folders."""
