"""adapterkit.core.plugin: the plugin contract: hook specs, the Method and Format contracts, capabilities, the registry."""
