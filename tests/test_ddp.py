"""DDP on CPU: exact eval sharding and gathering, heads without tokens under DDP, and a real Lightning run.

The multi-process tests use 2 gloo processes (``torch.multiprocessing.spawn``); the GPU counterpart,
with NCCL and SyncBatchNorm, is ``scripts/ddp_check.sh``.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dtop.data.sampler import EvalDistributedSampler, eval_sampler, shard_indices
from dtop.lit.distributed import gather_eval_rows

K = 5
# (dataset size, batch size) for the multi-process sharding test: not divisible by the world size, a single
# batch (per-image fallback), a partial last batch, one image per rank, uneven batch counts per rank.
CASES = [(5, 1), (5, 2), (5, 16), (2, 4), (7, 3), (64, 16), (101, 16)]


# ------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 16])
def test_shards_partition_the_data_in_whole_batches(world: int, batch: int) -> None:
    for n in range(world, 41):
        shards = [shard_indices(n, world, r, batch) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n)), (n, world, batch)
        assert all(shards), "every rank must run at least one batch"
        single = [list(range(b, min(b + batch, n))) for b in range(0, n, batch)]
        if len(single) >= world:  # each rank's batches are batches of the single-device loader
            for r, s in enumerate(shards):
                assert [s[i : i + batch] for i in range(0, len(s), batch)] == single[r::world]


def test_fewer_images_than_ranks_is_an_error() -> None:
    with pytest.raises(ValueError, match="3 images on 4 processes"):
        shard_indices(3, 4, 0, 1)


def test_single_process_is_untouched() -> None:
    assert not dist.is_initialized()
    assert eval_sampler(list(range(10)), 4) is None  # sequential loader as before
    rows = [{"image_id": "a"}, {"image_id": "a"}]
    assert gather_eval_rows(rows) == rows


def test_sampler_is_a_distributed_sampler_lightning_keeps() -> None:
    s = EvalDistributedSampler(list(range(11)), batch_size=4, num_replicas=2, rank=1)
    assert isinstance(s, DistributedSampler)  # Lightning only injects its padding sampler otherwise
    assert list(s) == [4, 5, 6, 7] and len(s) == 4
    assert s.rank_indices(0) == [0, 1, 2, 3, 8, 9, 10]


def test_policies_that_can_skip_heads() -> None:
    from dtop.models.policies import DoViT, DToP

    assert not DToP(0.9, context="topk", k=5).can_starve_heads()
    assert not DToP(0.9, context="avg_topk", k=1).can_starve_heads()
    assert not DToP(1.0, context="fixed_ratio", ratio=0.5).can_starve_heads()
    assert not DoViT(0.5).can_starve_heads()
    assert DToP(0.9, context="remove").can_starve_heads()
    assert DToP(0.9, context="average").can_starve_heads()
    assert DToP(0.9, context="topk", k=0).can_starve_heads()
    assert DToP(1.0, context="fixed_ratio", ratio=1.0).can_starve_heads()


def test_strategy_refuses_sync_batchnorm_with_a_policy_that_skips_heads() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
    from lightning.pytorch.trainer.states import TrainerFn

    from dtop.lit.distributed import SegDDPStrategy
    from dtop.models.policies import DToP

    strategy = SegDDPStrategy(parallel_devices=[torch.device("cpu")] * 2)
    strategy._layer_sync = TorchSyncBatchNorm()
    strategy._lightning_module = SimpleNamespace(model=SimpleNamespace(pruning=DToP(0.9, context="remove")))
    with pytest.raises(ValueError, match="sync_batchnorm=false"):
        strategy.setup(SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING)))


# -------------------------------------------------------------------------------- two gloo processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Toy(Dataset):
    """Labels with ignored pixels; ``pred`` is a fixed, image-dependent corruption of the label."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, K, (6, 7), generator=g)
        label[torch.rand(6, 7, generator=g) < 0.1] = 255
        pred = torch.where(torch.rand(6, 7, generator=g) < 0.3, torch.randint(0, K, (6, 7), generator=g), label)
        return {"image": pred, "label": label, "id": f"img{i:04d}"}


def _evaluate(n: int, batch: int, sampler) -> tuple[torch.Tensor, dict, list[dict]]:
    """What SegModule's eval does: confusion matrix + one row per image, then compute / gather."""
    from dtop.data.base import seg_collate
    from dtop.metrics import SegMetrics

    metrics = SegMetrics(K)
    rows: list[dict] = []
    for b in DataLoader(_Toy(n), batch_size=batch, sampler=sampler, shuffle=False, collate_fn=seg_collate):
        metrics.update(b["image"], b["label"])
        for i, image_id in enumerate(b["id"]):
            rows.append({"image_id": image_id, "correct": int((b["image"][i] == b["label"][i]).sum())})
    result = metrics.compute()  # syncs (sums) the confusion matrices of all ranks
    with metrics.sync_context():
        cm = metrics.confmat.clone()
    return cm, result, gather_eval_rows(rows, sampler)


def _reference(n: int) -> tuple[torch.Tensor, dict, list[dict]]:
    """One process, no torch.distributed: the whole set in order."""
    from dtop.metrics import SegMetrics

    metrics = SegMetrics(K, sync_on_compute=False)
    rows = []
    for i in range(n):
        s = _Toy(n)[i]
        metrics.update(s["image"][None], s["label"][None])
        rows.append({"image_id": s["id"], "correct": int((s["image"] == s["label"]).sum())})
    return metrics.confmat.clone(), metrics.compute(), rows


def _check_sharding(rank: int, world: int) -> None:
    for n, batch in CASES:
        sampler = eval_sampler(_Toy(n), batch)
        assert isinstance(sampler, EvalDistributedSampler)
        cm, result, rows = _evaluate(n, batch, sampler)
        # (a) the shards cover every index once, every rank has work
        shards = [None] * world
        dist.all_gather_object(shards, list(sampler))
        assert sorted(i for s in shards for i in s) == list(range(n)), (n, batch, shards)
        assert all(shards)
        # (b) the summed confusion matrix (and the metrics) are the single-process ones
        ref_cm, ref_result, ref_rows = _reference(n)
        assert torch.equal(cm, ref_cm), (n, batch)
        for key, value in ref_result.items():
            torch.testing.assert_close(result[key], value, rtol=0, atol=0, equal_nan=True)
        # (c) the gathered table has each id once, in dataset order, on every rank
        assert rows == ref_rows, (n, batch)
    # a padding sampler (what Lightning would inject): duplicates are dropped from the table, with a warning
    padded = DistributedSampler(_Toy(5), num_replicas=world, rank=rank, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, rows = _evaluate(5, 1, padded)
    assert [r["image_id"] for r in rows] == [f"img{i:04d}" for i in (0, 2, 4, 1, 3)]
    assert any("padding sampler" in str(w.message) for w in caught)


def _make_model(policy, num_classes: int = K):
    from dtop.models.build import build_segmentor
    from dtop.models.heads.fcn import FCNHead
    from dtop.models.vit import ViTBackbone

    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch16_224", img_size=(32, 48), depth=2)
    return build_segmentor(
        backbone, partial(FCNHead, channels=16), num_classes, partial(FCNHead, channels=16), [1], policy
    )


def _check_unused_heads(rank: int, world: int) -> None:
    """Rank 1 prunes every token after stage 0 (DToP remove, ξ = 0): its decode head gets no gradient."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dtop.lit.module import SegModule
    from dtop.models.policies import DToP

    module = SegModule(_make_model(DToP(1.0 if rank == 0 else 0.0, context="remove")), num_classes=K)
    module.train()
    reference = copy.deepcopy(module)  # the plain local model: what this rank computes alone
    ddp = DDP(module.model, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):  # without find_unused_parameters the 2nd step raises
        g = torch.Generator().manual_seed(100 * step + rank)
        images = torch.randn(2, 3, 32, 48, generator=g)
        target = torch.randint(0, K, (2, 32, 48), generator=g)
        out = ddp(images)
        loss = sum(module._loss(out, target, images).values())
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # the reference on the same weights and buffers as the DDP model
            for a, b in zip(
                list(reference.model.parameters()) + list(reference.model.buffers()),
                list(module.model.parameters()) + list(module.model.buffers()),
            ):
                a.copy_(b)
        reference.model.zero_grad(set_to_none=True)
        ref_out = reference.model(images)
        sum(reference._loss(ref_out, target, images).values()).backward()
        skipped = [n for n, p in reference.model.named_parameters() if p.grad is None]
        if rank == 1:
            assert ref_out.stats["tokens_per_stage"][:, 1].eq(0).all()
            assert any(n.startswith("decode_head.") for n in skipped), skipped
        else:
            assert not skipped
        # DDP's gradient is the mean over ranks of the local gradients, a skipped head counting as zero
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in reference.model.parameters()]
        )
        dist.all_reduce(flat)
        got = torch.cat([p.grad.flatten() for p in module.model.parameters()])
        torch.testing.assert_close(got, flat / world, rtol=1e-4, atol=1e-6)
        opt.step()


def _lightning_module(threshold: float, context: str):
    from dtop.lit.module import SegModule
    from dtop.models.policies import DToP

    return SegModule(_make_model(DToP(threshold, context=context, k=1), num_classes=8), num_classes=8, warmup_iters=0)


def _lightning_data():
    from dtop.data.synthetic import SyntheticDataModule

    return SyntheticDataModule(
        image_size=(32, 48), num_classes=8, train_size=4, val_size=5, batch_size=2, val_batch_size=2, seed=0
    )


def _lightning_trainer(devices: int, root: str, **kwargs):
    import lightning as L

    from dtop.lit.distributed import SegDDPStrategy

    if devices > 1:
        kwargs["strategy"] = SegDDPStrategy(find_unused_parameters=True)
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def _check_lightning(rank: int, world: int, out: str) -> None:
    """Lightning on the existing process group, as under torchrun: a test pass, then a short fit."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    module = _lightning_module(0.2, "topk")
    logged = _lightning_trainer(world, out).test(module, datamodule=_lightning_data(), verbose=False)[0]
    if rank == 0:
        torch.save(
            {"rows": module.per_image, "last_eval": module.last_eval, "logged": logged, "visuals": module.visuals},
            Path(out) / "ddp.pt",
        )
    # fit where rank 1 sends every token out at stage 0 (its decode head idles), validating on the 5 images
    module = _lightning_module(1.0 if rank == 0 else 0.0, "remove")
    trainer = _lightning_trainer(world, out, max_steps=2, check_val_every_n_epoch=1)
    trainer.fit(module, datamodule=_lightning_data())
    assert trainer.global_step == 2 and module.last_eval["images"] == 5
    sums = [None] * world
    dist.all_gather_object(sums, [float(p.detach().double().sum()) for p in module.model.parameters()])
    assert sums[0] == sums[1], "the ranks' weights diverged"


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_sharding(rank, world)
        _check_unused_heads(rank, world)
        _check_lightning(rank, world, out)
    finally:
        dist.destroy_process_group()


def test_two_cpu_processes(tmp_path: Path) -> None:
    """One spawn of 2 gloo processes (the imports dominate the time) runs three checks:

    - sharding: every image once, summed confusion matrix and gathered table equal to one process;
    - DDP with find_unused_parameters when one rank's decode head gets no token: correct mean gradient;
    - Lightning (``SegDDPStrategy``) test pass equal to ``devices=1`` below, and a short fit in which
      one rank's decode head idles, with validation.
    """
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "ddp.pt", weights_only=False)
    module = _lightning_module(0.2, "topk")
    _lightning_trainer(1, str(tmp_path)).test(module, datamodule=_lightning_data(), verbose=False)
    one = {"rows": module.per_image, "last_eval": module.last_eval, "visuals": module.visuals}
    assert one["last_eval"]["images"] == 5
    assert one["last_eval"]["tokens_per_stage"][1] < one["last_eval"]["tokens_per_stage"][0], "must really prune"
    assert [r["image_id"] for r in two["rows"]] == [r["image_id"] for r in one["rows"]]  # each once, same order
    assert two["rows"] == one["rows"]
    timing = ("images_per_s", "images_per_s_wall")  # wall clock: differs between any two runs
    assert {k: v for k, v in two["last_eval"].items() if k not in timing} == {
        k: v for k, v in one["last_eval"].items() if k not in timing
    }
    assert one["last_eval"]["images_per_s"] > 0
    for key in ("mIoU", "aAcc", "mAcc", "images", "gmacs"):
        assert two["logged"][f"test/{key}"] == pytest.approx(one["last_eval"][key], rel=1e-6), key  # float32 logs
    ids = [r["image_id"] for r in one["rows"]]
    assert [v["id"] for v in two["visuals"]] == [v["id"] for v in one["visuals"]] == ids
    for a, b in zip(two["visuals"], one["visuals"]):  # the dataset's first images, gathered from both ranks
        assert all(torch.equal(a[k], b[k]) for k in ("image", "label", "pred", "exit_stage"))
