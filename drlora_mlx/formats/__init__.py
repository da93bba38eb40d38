"""Formats: mlx-lm adapters, PEFT export and import, fuse, Hugging Face checkpoints, base models."""
