"""Storage: model checkpoints and training checkpoints (Orbax)."""
