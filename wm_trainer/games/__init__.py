"""Layer 2, games: the env specs (spec, no gymnasium) and the real gymnasium envs (real); imports only base."""
