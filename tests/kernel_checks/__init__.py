"""Checks of each Triton kernel against its op's PyTorch reference, one module per kernel.

Each runs as its own process (``python -m tests.kernel_checks.<name> <device> [<dtype>]``, started by
:func:`tests.kernel_check.kernel_check`): Triton picks its interpreter (CPU machines, with
``TRITON_INTERPRET=1``) or its compiler when a kernel is defined, so each mode needs a fresh
interpreter. Each prints ``ok <cases>``.
"""
