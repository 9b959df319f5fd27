"""Samplers: a resumable random training order, and exact (non-padding) evaluation sharding under DDP.

Under DDP Lightning would give an eval loader a ``DistributedSampler``, which pads the dataset to a
multiple of the world size by repeating images: the repeats would be counted twice in the summed
confusion matrix and appear twice in the per-image table. Instead the DataModule's val/test loaders
use :class:`EvalDistributedSampler` (a ``DistributedSampler``, so Lightning leaves it alone): no
padding, no duplicates, whole single-device batches per rank (so every image is computed with the
same shapes and kernels as on one device), and it knows which dataset indices each rank holds, so
the gathered rows can be put back into dataset order (:mod:`dtop.lit.distributed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(num_samples: int, world_size: int, rank: int, batch_size: int = 1) -> list[int]:
    """Dataset indices that ``rank`` evaluates, in order; the shards of all ranks partition the data.

    Whole batches of the sequential single-device loader go round-robin to the ranks; with fewer
    batches than ranks, single images do. Every rank gets at least one image.
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad shard request: world_size={world_size}, rank={rank}, batch_size={batch_size}")
    if num_samples < world_size:
        raise ValueError(
            f"cannot evaluate {num_samples} images on {world_size} processes without repeating "
            "some (every rank must run at least one batch). Evaluate on fewer devices."
        )
    num_batches = math.ceil(num_samples / batch_size)
    if num_batches < world_size:
        return list(range(rank, num_samples, world_size))
    return [
        i
        for b in range(rank, num_batches, world_size)
        for i in range(b * batch_size, min((b + 1) * batch_size, num_samples))
    ]


class EvalDistributedSampler(DistributedSampler):
    """Non-padding, batch-aligned eval sharding (see the module docstring); no shuffling, no epochs."""

    def __init__(
        self, dataset: Sized, batch_size: int = 1, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        if num_replicas is None or rank is None:
            r, w = dist_rank_world()
            num_replicas = w if num_replicas is None else num_replicas
            rank = r if rank is None else rank
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=False,  # type: ignore[arg-type]
            drop_last=False,
        )
        self.batch_size = batch_size
        self.total_size = len(dataset)
        self.indices = shard_indices(self.total_size, num_replicas, rank, batch_size)
        self.num_samples = len(self.indices)

    def rank_indices(self, rank: int) -> list[int]:
        """The dataset indices of any rank's shard, in the order that rank evaluates them."""
        return shard_indices(self.total_size, self.num_replicas, rank, self.batch_size)

    def __iter__(self):  # type: ignore[override]
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


def eval_sampler(dataset: Sized | None, batch_size: int) -> EvalDistributedSampler | None:
    """The sampler for a val/test loader: sharding under DDP, ``None`` (sequential) otherwise."""
    rank, world = dist_rank_world()
    if dataset is None or world == 1:
        return None
    return EvalDistributedSampler(dataset, batch_size, world, rank)


class EpochSeededRandomSampler(Sampler[int]):
    """Random permutation that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` on the train sampler at the start of every epoch (also
    after resuming from a checkpoint, with the restored epoch), so the data order of epoch
    ``e`` is the same whether or not the run was interrupted. A plain ``RandomSampler``
    with a seeded generator would instead restart from the epoch-0 order after a resume,
    because the generator's state is not checkpointed.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"cannot sample from an empty dataset (num_samples={num_samples})")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples
