"""Why pruned streams never take cuDNN attention: its cost when the sequence length changes.

python scripts/probe_cudnn_attention.py
Times SDPA through the cuDNN and flash backends with a new token count on every call (as pruning
gives) and with a repeated one, with and without backward; then cuDNN's ragged (varlen) attention
against flash varlen on packed segments, checked against per-image SDPA.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, D = 16, 64
g = torch.Generator().manual_seed(0)


def wall_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def sdpa(backend: SDPBackend, n: int, grad: bool) -> None:
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v)
        if grad:
            out.sum().backward()


print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
    for grad in (False, True):
        new = [wall_ms(lambda: sdpa(backend, int(torch.randint(2000, 6000, (1,), generator=g)), grad)) for _ in range(12)]
        same = [wall_ms(lambda: sdpa(backend, 4096, grad)) for _ in range(6)]
        print(f"{backend.name:16s} backward={grad!s:5s} new length each call: median {statistics.median(new[1:]):7.2f} ms; "
              f"same length: median {statistics.median(same[1:]):6.2f} ms")


def packed(lengths: list[int]):
    T = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v, cu, max(lengths)


def flash_varlen(q, k, v, cu, m):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, m, m, 0.0, False, False)[0]


def cudnn_varlen(q, k, v, cu, m):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, m, m, True, 0.0, False, False)[0]


lengths = [int(x) for x in torch.randint(300, 520, (8,), generator=g)]
q, k, v, cu, m = packed(lengths)
ref = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None].float() for t in (q, k, v)))[0]
                 .transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
for fn in (flash_varlen, cudnn_varlen):
    try:
        err = float((fn(q, k, v, cu, m).float() - ref).abs().max())
        times = [wall_ms(lambda: fn(q, k, v, cu, m)) for _ in range(6)]
        print(f"{fn.__name__:13s} 8 segments: median {statistics.median(times[1:]):6.2f} ms, max error {err:.2g}")
    except RuntimeError as err:
        print(f"{fn.__name__:13s} failed: {str(err)[:200]}")
