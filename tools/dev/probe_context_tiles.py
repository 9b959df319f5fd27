"""Tiles of the top-k context kernel (``dtop.kernels.context``) against the stream shapes pruning makes.

python tools/dev/probe_context_tiles.py
Per stream (images × graded tokens each: ViT-B/S 512² at batch 1, 8 and 32, ViT-L 1024×2048 at batch
1 and 2), µs per call of each (rows, cols, warps) tile in a CUDA graph, with the keep masks and exit
stages checked equal to the default tiles'. Half the tokens easy, classes drawn from 20 of 150 (a
segmentation map has few classes per image), so the per-class groups are large as in real maps.
"""

from __future__ import annotations

import torch

import dtop.kernels.context as kernel
from dtop.cli.bench import graph_ms

TILES = [(32, 64, 4), (16, 128, 4), (16, 256, 4), (32, 256, 8), (8, 256, 4), (16, 512, 8), (64, 128, 8)]
STREAMS = [(1, 1024), (8, 700), (32, 700), (1, 8192), (2, 6000)]


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    N, k = 8192, 5
    print("tiles (rows, cols, warps): " + " | ".join(map(str, TILES)))
    for B, n in STREAMS:
        T = B * n
        batch = torch.arange(B, device="cuda").repeat_interleave(n)
        cu = (torch.arange(B + 1, device="cuda") * n).to(torch.int32)
        pos = torch.arange(n, device="cuda").repeat(B)
        conf = torch.rand(T, device="cuda", generator=g)
        cls = torch.randint(0, 20, (T,), device="cuda", generator=g) * 7
        easy = torch.rand(T, device="cuda", generator=g) < 0.5
        exit_stage = torch.zeros(B * N + 1, dtype=torch.long, device="cuda")
        outs, times = [], []
        for tiles in TILES:
            exit_stage.zero_()

            def call(tiles: tuple[int, int, int] = tiles) -> torch.Tensor:
                return kernel.topk_context(conf, cls, easy, batch, pos, cu, k, N, exit_stage, 1, None, pos, tiles)

            outs.append((call().clone(), exit_stage.clone()))
            times.append(1e3 * graph_ms(call, reps=50, rounds=7))
        same = all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs)
        print(f"{B} × {n} tokens: " + " | ".join(f"{t:.1f}" for t in times) + f" µs; equal: {same}")


if __name__ == "__main__":
    main()
