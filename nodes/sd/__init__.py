"""The Stable Diffusion node packs: thin adapters over `ldm/`, grouped by concern."""
