"""Tuning sweeps: scripts that time a kernel family's block configs and its public ops on a GPU."""
