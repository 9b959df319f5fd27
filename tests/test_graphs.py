"""The CUDA-graph inference path (fixed-size stages + phantom image) computes what eager inference does.

On the CPU the graph programs run without capture: the same code, shapes and padding as on a GPU.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from dtop.models.build import build_segmentor
from dtop.models.graphs import GraphedSegmentor, StageGraphs
from dtop.models.heads.atm import ATMHead
from dtop.models.heads.segmenter import SegmenterHead
from dtop.models.policies import DoViT, DToP, RecordedDecisions, random_keep_masks
from dtop.models.vit import ViTBackbone
from tests.test_engine import make_model

STATS = ("tokens_per_stage", "exits_per_stage", "exits_per_class", "exit_stage")


def _same(graph_out, eager_out) -> None:
    torch.testing.assert_close(graph_out.logits, eager_out.logits, rtol=1e-4, atol=1e-4)
    for key in STATS:
        assert torch.equal(graph_out.stats[key], eager_out.stats[key]), key
    torch.testing.assert_close(graph_out.stats["macs"], eager_out.stats["macs"])
    torch.testing.assert_close(graph_out.stats["macs_linear"], eager_out.stats["macs_linear"])
    if eager_out.presence is None:
        assert graph_out.presence is None
    else:
        torch.testing.assert_close(graph_out.presence, eager_out.presence, rtol=1e-4, atol=1e-4)


POLICIES = [
    DToP(0.25, context="topk", k=1),
    DToP(0.25, context="remove"),
    DToP(0.25, context="average"),
    DToP(0.25, context="avg_topk", k=1),
    DToP(1.0, context="fixed_ratio", ratio=0.4),
    DToP([0.22, 0.3], context="topk", k=2),
    DoViT(0.22),
    DoViT(0.25, diff_conf=0.21),
    DToP(1.0),
]  # every policy and context rule


@pytest.mark.parametrize("steps", [128, 2])
@pytest.mark.parametrize("policy", POLICIES)
def test_fixed_size_stages_equal_eager_inference(policy, steps):
    model = make_model(policy=policy)
    runner = StageGraphs(bucket=8, capture=True, capture_after=10**6, steps=steps)  # never captures: eager sizes
    torch.manual_seed(1)
    for scale in (1.0, 2.5):  # twice: the second run reuses (and must reset) the same buffers
        images = torch.randn(3, 3, 48, 64) * scale
        with torch.no_grad():
            eager = model(images, keep_stages=False)
            graph = runner.run(model, images)
        _same(graph, eager)
    if policy.threshold != (1.0,) or policy.context == "fixed_ratio":
        assert eager.stats["tokens_per_stage"][:, -1].lt(eager.stats["tokens_per_stage"][:, 0]).any()
    assert len(runner.contexts) == 1
    # 3 images of 13 tokens: steps of 8 tokens (the bucket) on the fine grid, 24 on the coarse one; at most all 39
    step = {128: 8, 2: 24}[steps]
    sizes = [key[2] for key in runner.requests if len(key) == 4]  # (shape key, group, tokens, longest segment)
    (ctx,) = runner.contexts.values()
    assert len(sizes) >= len(ctx.groups) - 1 and all(t % step == 0 or t == 39 for t in sizes), sizes


@pytest.mark.parametrize("head", ["atm", "segmenter"])
def test_fixed_size_stages_equal_eager_with_attention_heads(head):
    torch.manual_seed(0)
    make = {"atm": partial(ATMHead, num_layers=1), "segmenter": partial(SegmenterHead, num_layers=1)}[head]
    backbone = ViTBackbone("vit_tiny_patch16_224", img_size=(48, 64), depth=4)
    model = build_segmentor(backbone, make, 5, make, [1, 2], DToP(0.3, k=1)).eval()
    for m in model.modules():  # lively presence/masks so that grades differ between tokens
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.3)
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        eager = model(images, keep_stages=False)
        graph = StageGraphs(bucket=8, capture=False).run(model, images)
    assert eager.stats["tokens_per_stage"][:, -1].lt(eager.stats["tokens_per_stage"][:, 0]).all()
    _same(graph, eager)


def test_recorded_decisions_replace_masks_in_place_and_check_the_batch():
    model = make_model(policy=RecordedDecisions(random_keep_masks(2, 12, [0.6, 0.3], 0.1)))
    runner = StageGraphs(bucket=8, capture=False)
    masks = [random_keep_masks(2, 12, [0.6, 0.3], 0.1, torch.Generator().manual_seed(s)) for s in (1, 2)]
    for m in masks:
        storage = [k.data_ptr() for k in model.pruning.keep]
        model.pruning.set_keep(m)
        assert [k.data_ptr() for k in model.pruning.keep] == storage
        images = torch.randn(2, 3, 48, 64)
        with torch.no_grad():
            eager = model(images, keep_stages=False)
            graph = runner.run(model, images)
        _same(graph, eager)
        assert torch.equal(eager.stats["tokens_per_stage"][:, 2], m[1].sum(1))
    with pytest.raises(ValueError, match="for 2 images"):
        with torch.no_grad():
            model(torch.randn(3, 3, 48, 64))


def test_threshold_change_uses_new_graphs():
    model = make_model(policy=DToP(0.3, k=1))
    runner = StageGraphs(bucket=8, capture=False)
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        runner.run(model, images)
        model.pruning.set_threshold(0.9)
        graph = runner.run(model, images)
        eager = model(images, keep_stages=False)
    _same(graph, eager)
    assert len(runner.contexts) == 2


class _Recorded:
    """Stands in for a captured graph on the CPU: the capture ran the program once, a replay does nothing."""

    def replay(self) -> None:
        pass


@pytest.mark.parametrize("capture_after", [1, 2])
def test_a_size_is_captured_when_asked_for_the_capture_after_th_time(monkeypatch, capture_after):
    model = make_model(policy=DToP(0.3, k=1))
    captures: list[int] = []

    def capture(self, program, ctx, warm):
        assert warm == (capture_after == 1)  # a size that already ran eagerly is recorded without warm-up
        captures.append(len(self.graphs))
        return _Recorded(), program()

    monkeypatch.setattr(StageGraphs, "_capture", capture)
    runner = StageGraphs(bucket=8, capture=True, capture_after=capture_after)
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        eager = model(images, keep_stages=False)
        groups = len(runner._context(model, images)[0].groups)
        for call in range(3):  # the same images: every call asks for the same sizes
            _same(runner.run(model, images), eager)
            assert len(runner.graphs) == (groups if call + 1 >= capture_after else 0), call
    assert groups == 3 and len(captures) == groups and not runner.requests
    with pytest.raises(ValueError, match="capture_after"):
        StageGraphs(capture_after=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [4, 1])  # batch 1: cuDNN over the bucket with the phantom's keys hidden
@pytest.mark.parametrize("capture_after", [1, 2])  # 2: recorded without warm-up, after an eager run
def test_captured_graphs_equal_eager_on_cuda(batch, capture_after):
    model = make_model(policy=DToP(0.25, k=1)).cuda()
    graphed = GraphedSegmentor(model, bucket=16, capture_after=capture_after)
    for seed in range(3):
        images = torch.randn(batch, 3, 48, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        for _ in range(capture_after + 1):  # the last call replays what an earlier one captured
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                graph = graphed(images)
                eager = model(images, keep_stages=True)
            assert torch.equal(graph.stats["tokens_per_stage"], eager.stats["tokens_per_stage"])
            assert float((graph.logits - eager.logits).abs().max() / eager.logits.abs().max()) < 2e-2
    assert graphed.graphs.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_capture_keeps_the_allocators_caches():
    """torch.cuda.graph empties the device and pinned-host caches on every capture; a stream of captures
    must not make the eager runs and the DataLoader's pinning between them allocate afresh."""
    model = make_model(policy=DToP(0.25, k=1)).cuda().to(torch.bfloat16)
    graphed = GraphedSegmentor(model, bucket=16)
    torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # freed at once: 256 MiB cached, unused
    reserved = torch.cuda.memory_reserved()
    with torch.no_grad():
        graphed(torch.randn(2, 3, 48, 64, device="cuda", dtype=torch.bfloat16))
    assert graphed.captured > 0 and torch.cuda.memory_reserved() >= reserved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unpruned_inference_and_training_loss_need_no_host_sync():
    from dtop.losses import cross_entropy

    model = make_model(policy=RecordedDecisions(random_keep_masks(2, 12, [0.6, 0.3], 0.1))).cuda()
    images = torch.randn(2, 3, 48, 64, device="cuda")
    labels = torch.randint(0, 5, (2, 48, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            model.predict(images)  # warm caches
        masks = [m.cuda() for m in random_keep_masks(2, 12, [0.6, 0.3], 0.1)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.pruning.set_keep(masks)
            with torch.no_grad(), model.dense_mode():
                model.predict(images)
            model.train()
            with model.dense_mode():
                out = model(images)
            loss = cross_entropy(model.upsample(out.logits, out), labels)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


def test_cuda_graphs_setting_is_checked_when_the_module_is_built():
    from dtop.errors import ConfigError
    from dtop.lit.module import SegModule

    with pytest.raises(ConfigError, match="cuda_graphs"):
        SegModule(make_model(), 5, cuda_graphs="yes")


def _evaluate_twice(accelerator: str, cuda_graphs):
    """A validate run then a test run: Lightning moves the model between them, so graphs must not outlive a loop."""
    import lightning as L

    from dtop.data.synthetic import SyntheticDataModule
    from dtop.lit.module import SegModule
    from dtop.models.heads.fcn import FCNHead

    dm = SyntheticDataModule(image_size=(48, 64), train_size=4, val_size=6, val_batch_size=3)
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch16_224", img_size=(48, 64), depth=4)
    model = build_segmentor(backbone, partial(FCNHead), 8, partial(FCNHead), [1, 2], DToP(0.3, context="topk", k=1))
    module = SegModule(model, 8, cuda_graphs=cuda_graphs)
    precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    kw = dict(accelerator=accelerator, devices=1, precision=precision, logger=False, enable_progress_bar=False)
    trainer = L.Trainer(enable_model_summary=False, **kw)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert module._graphed is None  # dropped at the loop's end
    first = dict(module.last_eval)
    trainer.test(module, datamodule=dm, verbose=False)
    assert module._graphed is None
    return first, dict(module.last_eval)


def _metrics(result: dict) -> dict:
    return {k: result[k] for k in ("mIoU", "aAcc", "gmacs", "keep_ratio_per_stage")}


def test_evaluation_loops_on_the_cpu_run_eagerly_and_report_throughput():
    val, test = _evaluate_twice("cpu", "auto")
    assert _metrics(val) == _metrics(test) and test["images_per_s"] > 0
    assert 0 < test["images_per_s_wall"] < test["images_per_s"] and test["graphs_captured"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_of_one_loop_are_not_replayed_in_the_next():
    graphs = _evaluate_twice("gpu", True)
    eager = _evaluate_twice("gpu", False)
    assert _metrics(graphs[0]) == _metrics(graphs[1]) == _metrics(eager[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_survives_another_thread_pinning_memory():
    """A DataLoader's pin-memory thread pins the next batch while evaluation captures: that must not
    invalidate the capture (it did under torch's default global capture mode)."""
    import threading

    model = make_model(policy=DToP(0.3, k=1)).cuda().to(torch.bfloat16)
    graphed = GraphedSegmentor(model, bucket=16)
    stop = threading.Event()

    def pin() -> None:
        while not stop.is_set():
            torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)

    worker = threading.Thread(target=pin, daemon=True)
    worker.start()
    try:
        with torch.no_grad():
            for seed in range(6):
                images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(seed))
                graphed(images.cuda().to(torch.bfloat16))
    finally:
        stop.set()
        worker.join()
    torch.cuda.synchronize()
    assert graphed.captured > 0
