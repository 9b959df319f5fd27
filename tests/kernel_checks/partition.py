"""The stream-partition kernel against :func:`dtop.ops.partition.partition_reference`: every output bit-equal."""

from __future__ import annotations

import sys

import torch

import dtop.kernels.partition as kernel
from dtop.ops.partition import partition_reference


def main(dev: str) -> int:
    g = torch.Generator().manual_seed(0)
    cases = 0
    for block in (128, 4096):  # 128: streams of several chunks take the grid
        kernel.MAX_BLOCK = block
        for lengths_img in ([3], [1, 0, 5], [40, 1, 0, 77, 300], [129, 128, 2]):
            for p_keep in (0.0, 0.5, 1.0):
                for absorb, phantom in ((False, 0), (False, 9), (True, 9)):
                    lengths = lengths_img + ([phantom] if phantom else [])
                    T = sum(lengths)
                    batch = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                    pos = torch.randint(-1, 50, (T,), generator=g)
                    flag = torch.rand(T, generator=g) < p_keep
                    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
                    n_img = len(lengths_img) + (phantom > 0 and absorb)
                    args = (flag, batch, pos, cu)
                    ref = partition_reference(*args, n_img, len(lengths_img), 11, absorb)
                    got = kernel.partition(*(t.to(dev) for t in args), n_img, len(lengths_img), 11, absorb)
                    for name, r, o in zip(("order", "batch", "pos", "cu", "stats"), ref, got):
                        assert r.dtype == o.dtype and torch.equal(r, o.cpu()), (name, lengths_img, p_keep, absorb)
                    cases += 1
    return cases


if __name__ == "__main__":
    print("ok", main(sys.argv[1]))
