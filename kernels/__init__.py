"""Compute kernels: numpy references (reference) and numba CPU kernels (cpu)."""
