"""Layer 4, training: what the stages share (trainer helpers, M's updater, CMA-ES); imports layers 0-3."""
