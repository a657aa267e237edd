"""AdaScale on PyTorch: `mechanics` (eager, in place)."""
