"""What happens to tokens at a stage end: the policies of the one engine.

- :class:`DToP` (:mod:`.dtop`): easy tokens exit with their stage head's logits; top-k per class stay as
  context.
- :class:`DoViT` (:mod:`.dovit`): confident tokens stop, keep their features and are reconstructed.
- :class:`RecordedDecisions` (:mod:`.recorded`): DToP replaying given keep masks (benchmarks).
"""

from dtop.models.policies.base import Decision, Policy
from dtop.models.policies.dovit import DoViT
from dtop.models.policies.dtop import CONTEXT_POLICIES, DToP
from dtop.models.policies.recorded import RecordedDecisions, random_keep_masks

__all__ = [
    "CONTEXT_POLICIES",
    "Decision",
    "DoViT",
    "DToP",
    "Policy",
    "RecordedDecisions",
    "random_keep_masks",
]
