"""Optimizers for binary weights (imported as ``bnnops.optim``)."""
