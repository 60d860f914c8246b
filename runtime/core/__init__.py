"""Infrastructure every part of the runtime shares: errors, safe file output, bounded reading,
the denoiser contract, the paper's noise schedules, and the model manifest."""
