"""adapterkit.cli: the click command line, one module per command group."""
