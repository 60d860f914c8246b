"""Seeds and settings in, images out: the solvers, their time steps, the planner that joins them
to a model, guidance, and the shared generation loop."""
