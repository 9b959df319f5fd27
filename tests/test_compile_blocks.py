"""``compile_blocks``: the blocks' per-token parts under ``torch.compile`` compute what the eager blocks do.

One training-mode pruned forward and backward (stochastic depth on: its per-image draws come from the
global RNG outside the compiled code, in the eager order) against the eager model with the same weights
and seed; then a second batch with other token counts must reuse the compiled code (dynamic in tokens).
"""

from __future__ import annotations

import copy

import pytest
import torch

from dtop.models.policies import DToP
from tests.test_engine import make_model
from tests.tolerance import assert_reordered_close

compile_backend = pytest.mark.skipif(
    not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported on this Python"
)


def _step(model, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    out = model(images)
    loss = out.logits.square().mean() + sum(s.square().mean() for s in out.stage_logits)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.backbone.parameters() if p.grad is not None])
    return out.logits, grads, out.stats


@compile_backend
def test_compiled_blocks_equal_eager_blocks_and_compile_once_for_every_token_count():
    eager = make_model(policy=DToP(0.25, context="topk", k=1), drop_path_rate=0.3).train()
    compiled = copy.deepcopy(eager)
    compiled.backbone.compile_blocks = True
    torch._dynamo.reset()
    torch.manual_seed(1)
    images = torch.randn(4, 3, 48, 64) * torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1, 1)

    logits, grads, stats = _step(compiled, images, seed=2)
    ref_logits, ref_grads, ref_stats = _step(eager, images, seed=2)
    assert stats["tokens_per_stage"][:, -1].lt(stats["tokens_per_stage"][:, 0]).any(), "the test must prune"
    assert torch.equal(stats["tokens_per_stage"], ref_stats["tokens_per_stage"])
    assert_reordered_close(logits, ref_logits)
    assert_reordered_close(grads, ref_grads)

    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    other = _step(compiled, images.flip(-1, -2) * 1.5, seed=3)[2]  # other images: other token counts
    assert not torch.equal(other["tokens_per_stage"].sum(0), stats["tokens_per_stage"].sum(0))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "new token counts recompiled"
