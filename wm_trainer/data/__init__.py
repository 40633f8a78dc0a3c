"""Layer 2, data: files on disk -> arrays (episodes, frames, latents); imports only base (and extensions)."""
