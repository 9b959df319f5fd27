"""Exact evaluation under DDP: every image on exactly one rank, results gathered to every rank.

Under DDP Lightning would give an eval loader a ``DistributedSampler``, which pads the dataset to a
multiple of the world size by repeating images: the repeats would be counted twice in the summed
confusion matrix and appear twice in the per-image table. Instead the DataModule's val/test loaders
use :class:`EvalDistributedSampler` (a ``DistributedSampler``, so Lightning leaves it alone):

- no padding, no duplicates; ranks may run one batch more or less than each other, which is safe
  in evaluation (DDP syncs buffers at most on the first eval forward, and the only collectives
  come at epoch end: the metric's confusion-matrix sum and the per-image gather);
- shards are whole single-device batches (batch ``b`` of the sequential loader goes to rank
  ``b % world``), so each image is computed in the same batch, with the same shapes and kernels,
  as on one device: per-image numbers (and so the metrics) are the same, not just close. Only with
  fewer batches than ranks does it fall back to one image at a time, round-robin;
- it knows which dataset indices each rank holds, so :func:`gather_eval_rows` puts the gathered
  per-image rows back into dataset order: the table and the means computed from it (GMACs,
  tokens per stage) are exactly the single-device ones; :func:`gather_eval_visuals` likewise
  collects the dataset's first images for the dashboards.

Training under DDP: :class:`SegDDPStrategy` (``conf/trainer/ddp.yaml``) and docs/multi_gpu.md.

Nothing here is active on one device (no process group, or a world of one): the loaders keep their
sequential sampler and the rows are returned as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import Sampler

from dtop.data.sampler import EvalDistributedSampler, dist_rank_world

__all__ = ["SegDDPStrategy", "all_gather_objects", "eval_loader_sampler", "gather_eval_rows", "gather_eval_visuals"]

# The eval scalars are logged with sync_dist=False on purpose: after the confusion-matrix sum and the
# row gather they are already global and identical on every rank (a mean-reduce would only add
# rounding), and rank_zero_only=True would hide val/mIoU from ModelCheckpoint on the other ranks.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/")


def eval_loader_sampler(trainer: Any, stage: str) -> Sampler | None:
    """The sampler of the (single) loader of the running ``val`` or ``test`` loop, if any."""
    if trainer is None:
        return None
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    if isinstance(loaders, Sequence):
        loaders = loaders[0] if len(loaders) == 1 else None
    return getattr(loaders, "sampler", None)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    _, world = dist_rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _ours(sampler: Sampler | None, world: int) -> bool:
    return isinstance(sampler, EvalDistributedSampler) and sampler.num_replicas == world


def _in_dataset_order(per_rank: list[list[Any]], sampler: EvalDistributedSampler) -> list[Any]:
    """Merge per-rank lists (item ``k`` of rank ``r`` = its ``k``-th image) into dataset order."""
    indexed: list[tuple[int, Any]] = []
    for r, items in enumerate(per_rank):
        idx = sampler.rank_indices(r)
        if len(items) > len(idx):
            raise RuntimeError(
                f"rank {r} produced {len(items)} eval rows for {len(idx)} images: one row per image is expected."
            )
        indexed.extend(zip(idx, items))  # fewer items than indices: limit_*_batches ran a prefix
    indexed.sort(key=lambda t: t[0])
    return [item for _, item in indexed]


def gather_eval_rows(
    rows: list[dict[str, Any]], sampler: Sampler | None = None, key: str = "image_id"
) -> list[dict[str, Any]]:
    """All ranks' per-image rows, each image once, on every rank (a collective: call it on all ranks).

    With an :class:`EvalDistributedSampler` the rows are put in dataset order (the order of one
    device) through the indices each rank held. With any other sampler the rows are concatenated
    rank after rank and rows whose ``key`` was seen already are dropped (a padding sampler repeats
    images; those repeats are also in the confusion matrix, so that case warns).
    """
    _, world = dist_rank_world()
    if world == 1:
        return list(rows)
    per_rank = all_gather_objects(list(rows))
    if _ours(sampler, world):
        return _in_dataset_order(per_rank, sampler)  # type: ignore[arg-type]
    warnings.warn(
        f"Distributed evaluation without EvalDistributedSampler ({type(sampler).__name__}): a padding "
        "sampler repeats images, which the confusion matrix then counts twice. Use the DataModule's "
        "val/test loaders (dtop.data.base.SegDataModule).",
        stacklevel=2,
    )
    out: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for rank_rows in per_rank:
        for row in rank_rows:
            if row[key] not in seen:
                seen.add(row[key])
                out.append(row)
    return out


def gather_eval_visuals(visuals: list[Any], sampler: Sampler | None, limit: int) -> list[Any]:
    """The visuals of the first ``limit`` images of the dataset, as on one device (a collective).

    Each rank kept its own first images; only those among the dataset's first ``limit`` travel.
    With another sampler each rank keeps its own.
    """
    _, world = dist_rank_world()
    if world == 1 or not _ours(sampler, world):
        return visuals
    mine = [v for i, v in zip(sampler.indices, visuals) if i < limit]  # type: ignore[union-attr]
    per_rank = all_gather_objects(mine)
    return _in_dataset_order(per_rank, sampler)[:limit]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- training
class SegDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` that refuses a setting that would deadlock instead of training.

    With ``sync_batchnorm`` every BatchNorm in the heads is a collective. A head that one rank skips
    (``Policy.can_starve_heads``) is a collective that rank never joins, so the ranks hang or pair up
    mismatched collectives. ``find_unused_parameters=True`` covers the gradient side of a skipped head
    (its parameters are reduced with a zero contribution) but not that. Without ``sync_batchnorm``
    such policies train fine.
    """

    def setup(self, trainer: Any) -> None:
        distributed = self.num_nodes * self.num_processes > 1
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync is not None and distributed:
            policy = getattr(getattr(self.lightning_module, "model", None), "pruning", None)
            if policy is not None and policy.can_starve_heads():
                raise ValueError(
                    f"{type(policy).__name__}(context={getattr(policy, 'context', None)!r}) can leave a head without "
                    "tokens on one GPU, and with trainer.sync_batchnorm=true that GPU would skip the head's "
                    "SyncBatchNorm collective and hang the others. Train with trainer.sync_batchnorm=false, or use "
                    "a context that always keeps tokens (model.pruning.context=topk with k >= 1)."
                )
        super().setup(trainer)
