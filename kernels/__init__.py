"""Triton kernels of rpo_fast, installed as the subpackage ``rpo_fast.kernels``."""
