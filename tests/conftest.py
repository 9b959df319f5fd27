"""Test-wide setup: make ``FlopCounterMode`` count CPU attention on every supported torch.

Older torch releases (2.11 among them) register no FLOP formula for the CPU flash-attention op that
``F.scaled_dot_product_attention`` dispatches to, so the analytic-MACs tests would compare against a
count that silently leaves attention out. The CPU op computes what the CUDA flash op does; its
formula is the same.
"""

import torch
from torch.utils import flop_counter

_aten = torch.ops.aten
for _cpu, _cuda in [
    ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward"),
]:
    if hasattr(_aten, _cpu) and getattr(_aten, _cpu) not in flop_counter.flop_registry:
        flop_counter.flop_registry[getattr(_aten, _cpu)] = flop_counter.flop_registry[getattr(_aten, _cuda)]
