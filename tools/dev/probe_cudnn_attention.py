"""Why pruned streams never take cuDNN attention: its cost when the sequence length changes.

python tools/dev/probe_cudnn_attention.py
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

from dtop.cli.bench import graph_ms

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
        new = [
            wall_ms(lambda: sdpa(backend, int(torch.randint(2000, 6000, (1,), generator=g)), grad)) for _ in range(12)
        ]
        same = [wall_ms(lambda: sdpa(backend, 4096, grad)) for _ in range(6)]
        print(
            f"{backend.name:16s} backward={grad!s:5s} new length each call: "
            f"median {statistics.median(new[1:]):7.2f} ms; "
            f"same length: median {statistics.median(same[1:]):6.2f} ms"
        )


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
ref = torch.cat(
    [
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None].float() for t in (q, k, v)))[0].transpose(0, 1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
    ]
)
for fn in (flash_varlen, cudnn_varlen):
    try:
        err = float((fn(q, k, v, cu, m).float() - ref).abs().max())
        times = [wall_ms(lambda: fn(q, k, v, cu, m)) for _ in range(6)]
        print(f"{fn.__name__:13s} 8 segments: median {statistics.median(times[1:]):6.2f} ms, max error {err:.2g}")
    except RuntimeError as err:
        print(f"{fn.__name__:13s} failed: {str(err)[:200]}")


def replay_us(fn, args, reps: int = 20) -> float:
    """µs per call of ``fn(*args)`` captured in a CUDA graph (host-side planning happens at capture)."""
    return 1e3 * graph_ms(lambda: fn(*args), reps=reps, rounds=1)


# Inside CUDA graphs (how cuda_graphs=true inference runs) the per-call planning is paid once, at capture.
for heads, lengths in (
    (12, [int(x) for x in torch.randint(500, 1025, (8,), generator=g)] + [200]),
    (16, [int(x) for x in torch.randint(500, 1025, (8,), generator=g)] + [200]),
    (16, [5400, 150]),
    (16, [5400, 5100, 300]),
):
    H = heads
    q, k, v, cu, m = packed(lengths)
    row = []
    for fn in (flash_varlen, cudnn_varlen):
        try:
            err = float((fn(q, k, v, cu, m).float() - flash_varlen(q, k, v, cu, m).float()).abs().max())
            row.append(f"{fn.__name__} {replay_us(fn, (q, k, v, cu, m)):8.1f} µs (vs flash {err:.1g})")
        except RuntimeError as err:
            row.append(f"{fn.__name__} failed: {str(err)[:120]}")
    n = sum(lengths)
    qd, kd, vd = (t.transpose(0, 1)[None] for t in (q, k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend):
            row.append(
                f"dense {backend.name[:5]} over all {n} "
                f"{replay_us(F.scaled_dot_product_attention, (qd, kd, vd)):8.1f} µs"
            )
    print(f"graph replay, {H} heads, segments {lengths}: " + "; ".join(row))


# One image plus its phantom tail (batch-1 graphs): cuDNN over the whole bucket with the tail's keys masked.
for heads, n, tb in ((12, 700, 768), (16, 700, 768), (16, 5400, 5568)):
    H = heads
    q, k, v, cu, m = packed([n, tb - n])
    ref = flash_varlen(q, k, v, cu, m)[:n].float()
    qd, kd, vd = (t.transpose(0, 1)[None] for t in (q, k, v))
    keys = torch.arange(tb, device="cuda") < n
    masks = {
        "bool [1,1,1,T]": keys[None, None, None, :],
        "bias [1,1,T,T] stride-0 rows": torch.zeros(tb, device="cuda", dtype=torch.bfloat16)
        .masked_fill(~keys, float("-inf"))[None, None, None, :]
        .expand(1, 1, tb, tb),
    }
    row = [f"flash varlen {replay_us(flash_varlen, (q, k, v, cu, m)):7.1f} µs"]
    for name, mask in masks.items():

        def masked(q, k, v, mask=mask):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        try:
            err = float((masked(qd, kd, vd)[0].transpose(0, 1)[:n].float() - ref).abs().max())
            row.append(f"cuDNN {name} {replay_us(masked, (qd, kd, vd)):7.1f} µs (err {err:.1g})")
        except RuntimeError as e:
            row.append(f"cuDNN {name} failed: {str(e).splitlines()[0][:100]}")
    print(f"graph replay, {H} heads, {n} real + {tb - n} phantom tokens: " + "; ".join(row))
