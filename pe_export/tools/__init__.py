"""Tools over exported files: bench, plot, inspect and the compatibility matrix."""
