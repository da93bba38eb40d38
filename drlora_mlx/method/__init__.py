"""The method: the equations of DR-LoRA, checkable on their own (no I/O, no display)."""
