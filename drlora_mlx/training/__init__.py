"""Training: the run, the compiled step, loss, optimizers, evaluation, checkpoints, lock, faults, memory plan."""
