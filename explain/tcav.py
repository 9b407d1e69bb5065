"""TCAV (Kim et al., ICML 2018): concept activation vectors and their statistical test, for any model
and any layer, with concepts given as tensors of examples.

As the official code (tensorflow/tcav ``cav.py``, ``tcav.py``, ``utils_plot.py``):

- a **CAV** separates the layer activations of a concept's examples from those of a counterpart set
  (a random set): both sets truncated to the smaller one, labels concept = 0 and counterpart = 1, a
  stratified split with 33% held out, ``SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3)`` (hinge loss:
  a linear SVM) or logistic regression; the CAV is the *raw* (unnormalised) coefficient vector pointing
  toward the concept, ``-coef``;
- the **TCAV score** of a class is the fraction of its examples whose directional derivative along the
  CAV is positive. Here the derivative is that of the class logit, as in the paper
  (``objective="logit"``); ``objective="cross_entropy"`` counts the examples whose cross-entropy loss
  decreases along the CAV, as the official code;
- the **test**: the concept is run against each of the random sets; the null distribution is every
  random set run against every other; ``scipy.stats.ttest_ind(null, concept)``, two-sided,
  significant if p <= 0.05. The official code applies no multiple-testing correction (the paper
  mentions Bonferroni), so none is applied here; the p-values are returned for that.

The model runs in batches on its device; CAVs are fitted with scikit-learn on the CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .posthoc import resolve_layer

__all__ = ["CAV", "layer_activations", "layer_gradients", "train_cav", "tcav_score", "run_tcav"]


@dataclass
class CAV:
    """A concept activation vector (D,), pointing toward the concept, and its held-out accuracy."""

    vector: Tensor
    accuracy: float


@contextlib.contextmanager
def _outputs(layers: Sequence[nn.Module]) -> Iterator[dict[int, Tensor]]:
    """The first output of each layer in a forward pass, by the layer's position in `layers`."""
    kept: dict[int, Tensor] = {}

    def keeper(index: int):
        def hook(module, inputs, output) -> None:
            kept.setdefault(index, output)

        return hook

    hooks = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(layers)]
    try:
        yield kept
    finally:
        for h in hooks:
            h.remove()


def _layers(model: nn.Module, layers) -> list[nn.Module]:
    return [resolve_layer(model, layer) for layer in ([layers] if isinstance(layers, (str, nn.Module)) else layers)]


def layer_activations(model: nn.Module, inputs: Tensor, layers, batch_size: int = 64) -> list[Tensor]:
    """Flattened outputs (N, D_l) of each of `layers` (modules or dotted names), on the CPU in float32."""
    modules = _layers(model, layers)
    device = next(model.parameters()).device
    out: list[list[Tensor]] = [[] for _ in modules]
    with torch.no_grad():
        for chunk in inputs.split(batch_size):
            with _outputs(modules) as kept:
                model(chunk.to(device))
            for i in range(len(modules)):
                out[i].append(kept[i].flatten(1).float().cpu())
    return [torch.cat(o) for o in out]


def layer_gradients(
    model: nn.Module, inputs: Tensor, target: int, layers, batch_size: int = 64, objective: str = "logit"
) -> list[Tensor]:
    """Gradients (N, D_l) of the target class's score with respect to each layer's flattened output:
    the logit (``objective="logit"``) or the log-softmax, i.e. minus the cross-entropy loss
    (``"cross_entropy"``), so that positive always means "more of the class"."""
    if objective not in ("logit", "cross_entropy"):
        raise ValueError(f"objective must be 'logit' or 'cross_entropy', got {objective!r}")
    modules = _layers(model, layers)
    device = next(model.parameters()).device
    out: list[list[Tensor]] = [[] for _ in modules]
    with torch.enable_grad():
        for chunk in inputs.split(batch_size):
            x = chunk.to(device)
            if x.is_floating_point():  # so that a layer with no parameters before it gets a gradient
                x = x.clone().requires_grad_(True)
            with _outputs(modules) as kept:
                logits = model(x).float()
            scores = logits.log_softmax(1) if objective == "cross_entropy" else logits
            grads = torch.autograd.grad(scores[:, target].sum(), [kept[i] for i in range(len(modules))])
            for i, g in enumerate(grads):
                out[i].append(g.flatten(1).float().cpu())
    return [torch.cat(o) for o in out]


def train_cav(concept: Tensor, counterpart: Tensor, alpha: float = 0.01, model_type: str = "linear", seed: int = 0) -> CAV:
    """Fit a CAV on activations (N1, D) of the concept and (N2, D) of its counterpart (module docstring)."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.model_selection import train_test_split

    if concept.ndim != 2 or counterpart.ndim != 2 or concept.shape[1] != counterpart.shape[1]:
        raise ValueError(f"train_cav needs two (N, D) activation sets of one layer, got {tuple(concept.shape)} "
                         f"and {tuple(counterpart.shape)}")
    n = min(len(concept), len(counterpart))
    if n < 3:
        raise ValueError(f"train_cav needs at least 3 examples per set, got {n}")
    x = torch.cat([concept[:n], counterpart[:n]]).double().numpy()
    y = np.repeat([0, 1], n)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.33, stratify=y, random_state=seed)
    if model_type == "linear":
        classifier = SGDClassifier(alpha=alpha, max_iter=1000, tol=1e-3, random_state=seed)
    elif model_type == "logistic":
        classifier = LogisticRegression()
    else:
        raise ValueError(f"model_type must be 'linear' or 'logistic', got {model_type!r}")
    classifier.fit(x_train, y_train)
    accuracy = float((classifier.predict(x_test) == y_test).mean())
    return CAV(torch.from_numpy(-classifier.coef_[0]).float(), accuracy)


def tcav_score(gradients: Tensor, cav: CAV) -> float:
    """Fraction of the examples (rows of `gradients`) whose directional derivative along the CAV is > 0."""
    return float((gradients @ cav.vector > 0).float().mean())


def run_tcav(
    model: nn.Module, layers, targets: dict[int, Tensor], concepts: dict[str, Tensor], randoms: Sequence[Tensor],
    alpha: float = 0.01, model_type: str = "linear", objective: str = "logit", batch_size: int = 64, seed: int = 0,
) -> list[dict]:
    """TCAV of every concept for every target class at every layer, with the test against random sets.

    Args:
        targets: class index -> its examples (inputs of the model).
        concepts: concept name -> its examples.
        randoms: at least 2 sets of random examples.
    Returns:
        rows {layer, target, concept, scores (one per random set), mean, std, null_mean, p_value,
        significant, cav_accuracy (mean over the runs)}.
    """
    from scipy.stats import ttest_ind

    if len(randoms) < 2:
        raise ValueError(f"run_tcav needs at least 2 random sets for the test, got {len(randoms)}")
    names = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    labels = [n if isinstance(n, str) else type(n).__name__ for n in names]
    concept_acts = {c: layer_activations(model, x, names, batch_size) for c, x in concepts.items()}
    random_acts = [layer_activations(model, x, names, batch_size) for x in randoms]
    grads = {t: layer_gradients(model, x, t, names, batch_size, objective) for t, x in targets.items()}
    rows = []
    for li, label in enumerate(labels):
        null_cavs = [train_cav(random_acts[i][li], random_acts[j][li], alpha, model_type, seed)
                     for i in range(len(randoms)) for j in range(len(randoms)) if i != j]
        concept_cavs = {c: [train_cav(acts[li], r[li], alpha, model_type, seed) for r in random_acts]
                        for c, acts in concept_acts.items()}
        for t in targets:
            g = grads[t][li]
            null = [tcav_score(g, cav) for cav in null_cavs]
            for c, cavs in concept_cavs.items():
                scores = [tcav_score(g, cav) for cav in cavs]
                p = float(ttest_ind(null, scores).pvalue)
                p = 1.0 if np.isnan(p) else p  # identical constant samples: no evidence
                rows.append({"layer": label, "target": t, "concept": c, "scores": scores,
                             "mean": float(np.mean(scores)), "std": float(np.std(scores)),
                             "null_mean": float(np.mean(null)), "p_value": p, "significant": p <= 0.05,
                             "cav_accuracy": float(np.mean([cav.accuracy for cav in cavs]))})
    return rows
