"""adapterkit.plugins: the built-in method and format plugins (loaded through entry points)."""
