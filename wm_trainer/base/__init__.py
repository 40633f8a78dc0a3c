"""Layer 1, base: errors, CuPy shims, storage, process pools, the reaper; imports no other wm_trainer module."""
