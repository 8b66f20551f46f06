"""Triton kernels and their launchers (installed as ``llmembed_fast.triton_kernels``).

Kernels only: no autograd, no argument checking, no API decisions; ``llmembed_fast.ops`` owns those.
Importing a submodule needs ``triton``.
"""
