"""Layer 4, sim: V+M+C playing, in the real game (rollout) or in M's dream; imports layers 0-3."""
