"""On a GPU, the fused kernels (eager and replayed as CUDA graphs) make the decisions the PyTorch
reference makes (``DTOP_KERNELS=0``), for every policy and context rule: token counts, exit stages,
MACs and labels equal."""

from __future__ import annotations

import pytest
import torch

from dtop.models.graphs import GraphedSegmentor
from tests.test_engine import make_model
from tests.test_graphs import POLICIES, STATS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{type(p).__name__}-{getattr(p, 'context', '')}")
def test_kernels_decide_as_the_reference_on_cuda(policy, monkeypatch):
    torch.backends.cudnn.allow_tf32 = False
    model = make_model(policy=policy).cuda()
    graphed = GraphedSegmentor(model, bucket=16)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        images = (torch.randn(3, 3, 48, 64, generator=g) * 2).cuda()
        with torch.no_grad():
            monkeypatch.setenv("DTOP_KERNELS", "0")
            ref_labels, ref = model.segment(images)
            monkeypatch.delenv("DTOP_KERNELS")
            runs = [model.segment(images), graphed.segment(images)]
        for labels, out in runs:
            for key in STATS:
                assert torch.equal(out.stats[key], ref.stats[key]), key
            torch.testing.assert_close(out.stats["macs"], ref.stats["macs"])
            assert torch.equal(labels, ref_labels)
