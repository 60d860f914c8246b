"""Where sampled images go: PNG trees, `.npz`, grids, and the run record that makes resuming safe."""
