"""Triton kernels and their launchers, installed as ``genfast.kernels``.

Nothing here imports genfast: a launcher takes tensors the op has already
checked and returns tensors.
"""
