"""adapterkit.core.demo: the demo and the real pretrained models it prepares."""
