"""DR-LoRA: dynamic-rank LoRA for Mixture-of-Experts models, on MLX."""

__version__ = "0.1.0"

