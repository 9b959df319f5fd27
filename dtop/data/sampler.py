"""Samplers and loaders: a resumable, seeded training order, and exact (non-padding) evaluation under DDP.

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
import signal
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


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


class EpochSeededRandomSampler(DistributedSampler):
    """A random order, and a seed for each sample's augmentations, that depend only on ``(seed, epoch)``.

    Yields ``(index, sample seed)``; :class:`SeededSamples` draws the sample's augmentations from its
    seed, so which image a step sees and how it is augmented are pure functions of the run's seed,
    the epoch and the position in it: the same with any number of workers, and the same after a
    resume. Lightning calls ``set_epoch`` at every epoch start (after a resume too); ``start`` skips
    the first positions of this rank's epoch (:class:`ResumableDataLoader` sets it when resuming).

    Under DDP rank ``r`` of ``w`` takes positions ``r, r + w, ...`` of the epoch's order (the tail that
    does not fill every rank is dropped); a ``DistributedSampler``, so Lightning does not wrap it.
    """

    def __init__(self, num_samples: int, seed: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"cannot sample from an empty dataset (num_samples={num_samples})")
        r, w = dist_rank_world()
        num_replicas = w if num_replicas is None else num_replicas
        rank = r if rank is None else rank
        super().__init__(
            range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.total = num_samples
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.total, generator=g)
        seeds = torch.randint(0, 2**62, (self.total,), generator=g)
        mine = slice(self.rank, self.num_samples * self.num_replicas, self.num_replicas)
        order, seeds = order[mine], seeds[mine]
        start, self.start = self.start, 0
        return iter(zip(order[start:].tolist(), seeds[start:].tolist()))

    def __len__(self) -> int:
        return self.num_samples


class SeededSamples(Dataset):
    """``dataset[index]`` computed with torch's CPU RNG seeded by the sample seed a key carries.

    Keys are ``(index, seed)`` (from :class:`EpochSeededRandomSampler`) or plain indices (left as they
    are). The caller's RNG state is restored afterwards.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """A training loader whose position in the epoch is part of the checkpoint.

    Lightning saves ``state_dict()`` with the fit loop and hands it back to ``load_state_dict`` when a
    run resumes (its stateful-loader protocol); the next epoch iteration then starts at the batch the
    interrupted run would have taken next. Needs an :class:`EpochSeededRandomSampler`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSeededRandomSampler) or self.batch_size is None:
            raise TypeError("ResumableDataLoader needs an EpochSeededRandomSampler and a batch_size.")
        self._batches = 0  # batches handed out in the current epoch
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        self._batches, self._resume_at = self._resume_at, 0
        self.sampler.start = self._batches * self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        self._resume_at = int(state["batches"])


def ignore_sigint(worker_id: int) -> None:
    """Data workers leave Ctrl-C to the main process, which stops between steps and saves a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
