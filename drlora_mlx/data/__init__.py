"""Data: training examples in mlx-lm's formats, their batches, and the bundled tasks."""
