"""Layer 3, models: V, M and C (and V's fireball check); imports ops, base, data, games and extensions."""
