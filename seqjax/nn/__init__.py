"""Pure Flax modules: no training, files or logging."""
