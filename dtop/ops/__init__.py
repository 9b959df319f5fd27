"""The fast-path layer: one module per operation, each holding its PyTorch reference, the test of
whether a Triton kernel (:mod:`dtop.kernels`) may run it instead, and that kernel's call.

Callers (the engine, policies, losses) call the op and never see a kernel; the kernels see plain
tensors and never import the package. Every kernel is tested against its op's reference.
"""
