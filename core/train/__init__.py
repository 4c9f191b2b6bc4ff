"""adapterkit.core.train: training an adapter: options, data, the loop, data parallelism, the Trainer callback."""
