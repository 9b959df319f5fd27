"""dtop-bench's synthetic grades: the configured policy runs in full and keeps the requested tokens."""

from __future__ import annotations

import pytest
import torch

from dtop.models.graphs import StageGraphs
from dtop.models.policies import DoViT, DToP, RecordedDecisions, random_keep_masks
from dtop.models.policies.synthetic import SyntheticGrades
from tests.test_engine import K, make_model
from tests.test_graphs import _same

SIZE = (96, 128)  # 6 × 8 = 48 patch tokens per image
B, N = 3, 48


def _masks(seed: int, keep=(0.6, 0.35)) -> list[torch.Tensor]:
    return random_keep_masks(B, N, keep, 0.2, torch.Generator().manual_seed(seed))


def _expected_exit_stage(masks: list[torch.Tensor]) -> torch.Tensor:
    """A token leaves at the first stage whose mask drops it; kept throughout, at the last stage."""
    stage = torch.full((B, N), len(masks), dtype=torch.long)
    for s in reversed(range(len(masks))):
        stage[~masks[s]] = s
    return stage


def _run(policy, masks, classes_per_image=8):
    model = make_model(img_size=SIZE, policy=policy)
    grades = SyntheticGrades(model.aux_heads, masks, K, classes_per_image, torch.Generator().manual_seed(0))
    images = torch.randn(B, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images, keep_stages=False)
    return model, grades, images, out


def test_without_context_the_policy_keeps_exactly_the_masks_and_matches_recorded_decisions():
    masks = _masks(0)
    _, grades, images, out = _run(DToP(0.95, context="remove"), masks)
    assert torch.equal(out.stats["exit_stage"].view(B, N), _expected_exit_stage(masks))
    recorded = make_model(img_size=SIZE, policy=RecordedDecisions(masks))
    with torch.no_grad():
        replay = recorded(images, keep_stages=False)
    assert torch.equal(replay.stats["exit_stage"], out.stats["exit_stage"])
    assert torch.equal(replay.stats["tokens_per_stage"], out.stats["tokens_per_stage"])
    grades.remove()


def test_topk_context_adds_at_most_k_tokens_per_class_shown_in_the_image():
    masks, k, classes = _masks(1), 1, 3
    _, grades, _, out = _run(DToP(0.95, context="topk", k=k), masks, classes_per_image=classes)
    tokens = out.stats["tokens_per_stage"]  # [B, S]: the tokens each stage computes
    for s, mask in enumerate(masks, start=1):
        extra = tokens[:, s] - mask.sum(1)
        assert (extra >= 0).all() and (extra <= k * classes).all(), (s, extra)
    assert (tokens[:, 1] - masks[0].sum(1)).sum() > 0  # the context rule did run
    grades.remove()


def test_set_keep_changes_the_decisions_in_place():
    first, second = _masks(2), _masks(3, keep=(0.4, 0.2))
    model, grades, images, _ = _run(DToP(0.95, context="remove"), first)
    stored = [m.data_ptr() for m in grades.keep]
    grades.set_keep(second)
    assert [m.data_ptr() for m in grades.keep] == stored  # a captured graph reads the same storage
    with torch.no_grad():
        out = model(images, keep_stages=False)
    assert torch.equal(out.stats["exit_stage"].view(B, N), _expected_exit_stage(second))
    grades.remove()


@pytest.mark.parametrize("policy", [DToP(0.95, context="topk", k=2), DoViT(0.95)])
def test_graph_programs_on_synthetic_grades_equal_eager(policy):
    masks = _masks(4) if isinstance(policy, DToP) else _masks(4, keep=(0.8, 0.6))
    model, grades, images, eager = _run(policy, masks)
    with torch.no_grad():
        graph = StageGraphs(bucket=8, capture=False).run(model, images)
    _same(graph, eager)
    assert (eager.stats["tokens_per_stage"][:, -1] < N).all()  # tokens did leave
    grades.remove()


def test_training_gradients_still_reach_the_aux_heads():
    masks = _masks(5)
    model = make_model(img_size=SIZE, policy=DToP(0.95)).train()
    grades = SyntheticGrades(model.aux_heads, masks, K)
    out = model(torch.randn(B, 3, *SIZE))
    sum(m.float().sum() for m in out.stage_logits).backward()
    assert all(p.grad is not None for p in model.aux_heads[0].parameters() if p.requires_grad)
    grades.remove()
