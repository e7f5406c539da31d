"""Training: the recipe becomes a run (builders, the one step and its loop, checkpoints, data, cache)."""
