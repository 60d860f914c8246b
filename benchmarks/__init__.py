"""Side-by-side benchmarks: every figure is a ratio or a fraction measured in one run."""
