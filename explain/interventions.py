"""Test-time intervention on concept bottleneck models (Koh et al., ICML 2020, Sec. 6): task accuracy as
the predicted concepts of more and more concept groups are replaced by the true ones.

The paper's order is random: for each image independently, a random order of the concept groups is
drawn and the first n groups are replaced, n = 0 ... G; each trial draws new orders, and the official
``tti.py`` reports the best of 5 trials per n (``accuracy``; the mean over trials is ``accuracy_mean``).
Here the n groups of one trial are the first n of one order, so the intervened sets of a trial are nested
(the official code draws each n's groups afresh; per n the distribution is the same). Where the model's
predictor reads concept logits, a true 0 / 1 is that concept's 5th / 95th percentile of the predicted
logits over the evaluated set (`models.cbm.ConceptBottleneck.intervention_values`).

Works with any model that has ``concept_logits(images)``, ``intervene(concept_logits, concepts, groups,
reference_logits)`` and ``num_groups``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["concept_outputs", "intervention_curve", "random_group_orders"]


@torch.no_grad()
def concept_outputs(model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """Predicted concept logits (N, k) of `images` (N, 3, H, W), in batches on the model's device."""
    device = next(model.parameters()).device
    return torch.cat([model.concept_logits(images[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def random_group_orders(num_images: int, num_groups: int, generator: torch.Generator) -> Tensor:
    """(N, G) rank of each group in an independent random order per image (rank < n: intervened at n)."""
    return torch.rand(num_images, num_groups, generator=generator).argsort(dim=1).argsort(dim=1)


@torch.no_grad()
def intervention_curve(model: nn.Module, concept_logits: Tensor, concepts: Tensor, labels: Tensor,
                       trials: int = 5, seed: int = 0) -> dict[str, Any]:
    """Task accuracy after intervening on n = 0 ... G random concept groups per image.

    Args:
        model: a concept bottleneck model (see the module docstring).
        concept_logits: predicted concept logits (N, k) of the evaluated set.
        concepts: true concepts (N, k) in {0, 1}.
        labels: true classes (N,).
        trials: random orders per image; the official figure keeps the best trial per n.
        seed: of the random orders.

    Returns:
        ``groups`` [0, ..., G], ``accuracy`` (best trial per n, as the official code), ``accuracy_mean``,
        ``accuracy_trials`` (trials, G + 1) as lists of floats.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not (len(concept_logits) == len(concepts) == len(labels)):
        raise ValueError(f"concept_logits, concepts and labels differ in length: {len(concept_logits)}, "
                         f"{len(concepts)}, {len(labels)}")
    device = model.predictor.weight.device if hasattr(model, "predictor") else next(model.parameters()).device
    logits, concepts, labels = concept_logits.to(device), concepts.to(device), labels.to(device)
    groups = int(model.num_groups)
    generator = torch.Generator().manual_seed(seed)
    table = torch.empty(trials, groups + 1)
    for t in range(trials):
        rank = random_group_orders(len(labels), groups, generator).to(device)
        for n in range(groups + 1):
            out = model.intervene(logits, concepts, rank < n, reference_logits=logits)
            table[t, n] = (out.argmax(1) == labels).float().mean().item()
    return {"groups": list(range(groups + 1)), "accuracy": table.max(0).values.tolist(),
            "accuracy_mean": table.mean(0).tolist(), "accuracy_trials": table.tolist()}
