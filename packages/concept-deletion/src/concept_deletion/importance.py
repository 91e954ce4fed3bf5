"""Concept-importance measures on a concept code, per image (local) and per class (global).

Every measure scores how much each concept matters for one target logit ``y = h(u)[target]``
of each image, from the cached code ``u`` and the head ``h`` only:

* ``contribution``: supplied by the caller, e.g. FaCT's model-inherent contributions (Eq. 9);
* ``saliency``: ``|dy/du|`` (Simonyan et al.);
* ``gradient_x_input``: ``dy/du * u``;
* ``integrated_gradients``: ``u * mean_alpha dy/du(alpha u)`` along the straight path from the
  zero baseline, with a Riemann or trapezoid rule (Sundararajan et al.);
* ``sobol``: Sobol total indices of concept-wise multiplicative masks ``u * m`` (Jansen
  estimator, as CRAFT; on i.i.d. uniform masks by default, CRAFT's Halton design on request);
* ``occlusion``: ``y(u) - y(u with concept k set to 0)``;
* ``random``: i.i.d. uniform scores, the floor.

Per-position measures are reduced over positions with a :class:`Reduction`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from concept_deletion.choices import ChoiceEnum
from concept_deletion.head import (
    DEFAULT_MAX_ELEMENTS,
    check_logits,
    check_targets,
    evaluate_masked,
    rows_per_chunk,
    target_logits,
)
from concept_deletion.layout import Layout, Reduction, apply_masks, check_codes, reduce_positions
from concept_deletion.sobol import QMCSequence, jansen_total_indices

__all__ = [
    "IGRule",
    "ImportanceConfig",
    "Measure",
    "active_concepts",
    "class_importance",
    "expand_class_importance",
    "gradient_x_input",
    "integrated_gradients",
    "local_importance",
    "occlusion",
    "random_importance",
    "saliency",
    "sobol_total_indices",
]


class Measure(ChoiceEnum, kind="measure"):
    """The importance measures compared by the concept-deletion metric."""

    CONTRIBUTION = "contribution"
    SALIENCY = "saliency"
    GRADIENT_X_INPUT = "gradient_x_input"
    INTEGRATED_GRADIENTS = "integrated_gradients"
    SOBOL = "sobol"
    OCCLUSION = "occlusion"
    RANDOM = "random"


class IGRule(ChoiceEnum, kind="ig_rule"):
    """Quadrature of the Integrated-Gradients path integral with ``steps`` intervals."""

    RIEMANN_LEFT = "riemann_left"
    RIEMANN_RIGHT = "riemann_right"
    RIEMANN_MIDDLE = "riemann_middle"
    TRAPEZOID = "trapezoid"

    def nodes(self, steps: int) -> tuple[Tensor, Tensor]:
        """Path positions ``alpha`` in [0, 1] and weights summing to 1."""
        if steps < 1:
            raise ValueError(f"integrated gradients needs steps >= 1, got {steps}")
        k = torch.arange(steps, dtype=torch.float64)
        if self is IGRule.TRAPEZOID:
            alphas = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
            weights = torch.full((steps + 1,), 1.0 / steps, dtype=torch.float64)
            weights[[0, -1]] /= 2
            return alphas, weights
        offset = {IGRule.RIEMANN_LEFT: 0.0, IGRule.RIEMANN_RIGHT: 1.0, IGRule.RIEMANN_MIDDLE: 0.5}
        alphas = (k + offset[self]) / steps
        return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


@dataclass(frozen=True)
class ImportanceConfig:
    """Settings of the importance measures.

    Attributes:
        reduction: spatial reduction of per-position measures; ``None`` uses each measure's
            default (signed ``sum`` for contribution, Gradient x Input and IG, whose sum over
            positions is the concept's additive share of the logit; ``max_abs`` for saliency,
            as xplique's holistic CRAFT).
        ig_steps: number of quadrature intervals of Integrated Gradients.
        ig_rule: quadrature rule of Integrated Gradients.
        sobol_designs: number of designs ``N`` of the Sobol estimator; it costs
            ``N * (K_active + 1)`` head evaluations per image (CRAFT: 32; FaCT paper: 4).
        sobol_sequence: point set of the Sobol design: ``'random'`` (default; i.i.d. uniform
            masks, unbiased at any K) or ``'halton'`` / ``'sobol'``. CRAFT's and the paper's
            design is unscrambled ``'halton'``: reproduce it with ``sobol_sequence='halton'``,
            but at thousands of concepts its indices follow the concept index rather than the
            head (see :mod:`concept_deletion.sobol`).
        sobol_scramble: scramble a ``'halton'`` or ``'sobol'`` sequence (CRAFT: no).
        skip_inactive: give concepts whose code is 0 at every position of an image exactly 0
            importance under Sobol and occlusion without evaluating them (their masks leave
            the code unchanged, so the estimate would be exactly 0 anyway).
        seed: seed of the random order and of the random (or scrambled) Sobol design.
        max_elements: memory budget, code elements per forward pass of the head.
    """

    reduction: Reduction | str | None = None
    ig_steps: int = 32
    ig_rule: IGRule | str = IGRule.TRAPEZOID
    sobol_designs: int = 4
    sobol_sequence: QMCSequence | str = QMCSequence.RANDOM
    sobol_scramble: bool = False
    skip_inactive: bool = True
    seed: int = 0
    max_elements: int = DEFAULT_MAX_ELEMENTS


def _weighted_gradient_sum(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor,
    alphas: Tensor,
    weights: Tensor,
    max_elements: int,
) -> Tensor:
    """``sum_j weights[j] * d y_b / d u (alphas[j] * u_b)`` for every image ``b``."""
    b, n_alpha = codes.shape[0], alphas.numel()
    alphas = alphas.to(device=codes.device, dtype=codes.dtype)
    weights = weights.to(device=codes.device, dtype=codes.dtype)
    out = torch.zeros_like(codes)
    n_rows = b * n_alpha
    step = rows_per_chunk(tuple(codes.shape[1:]), max_elements)
    for start in range(0, n_rows, step):
        rows = torch.arange(start, min(start + step, n_rows), device=codes.device)
        img, j = rows // n_alpha, rows % n_alpha
        view = (-1,) + (1,) * (codes.ndim - 1)
        x = (codes[img] * alphas[j].view(view)).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head(x)
            if logits.ndim != 2 or logits.shape[0] != rows.numel():
                raise ValueError(f"the head must return (B, C) logits, got {tuple(logits.shape)}")
            y = target_logits(logits, targets[img]).sum()
            (grad,) = torch.autograd.grad(y, x)
        out.index_add_(0, img, grad * weights[j].view(view))
    return out


def _reduction(config: ImportanceConfig, default: Reduction) -> Reduction:
    return default if config.reduction is None else Reduction.parse(config.reduction)


def saliency(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor | int,
    layout: Layout | str,
    config: ImportanceConfig = ImportanceConfig(),
) -> Tensor:
    """``|dy/du|`` reduced over positions (default ``max_abs``) -> ``(B, K)``."""
    layout = check_codes(codes, layout)
    t = check_targets(targets, codes.shape[0], codes.device)
    one = torch.ones(1, dtype=torch.float64)
    grad = _weighted_gradient_sum(head, codes, t, one, one, config.max_elements)
    return reduce_positions(grad.abs(), layout, _reduction(config, Reduction.MAX_ABS))


def gradient_x_input(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor | int,
    layout: Layout | str,
    config: ImportanceConfig = ImportanceConfig(),
) -> Tensor:
    """``dy/du * u`` reduced over positions (default signed ``sum``) -> ``(B, K)``.

    For a head that is linear in the code this is exactly each concept's share of the logit.
    """
    layout = check_codes(codes, layout)
    t = check_targets(targets, codes.shape[0], codes.device)
    one = torch.ones(1, dtype=torch.float64)
    grad = _weighted_gradient_sum(head, codes, t, one, one, config.max_elements)
    return reduce_positions(grad * codes, layout, _reduction(config, Reduction.SUM))


def integrated_gradients(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor | int,
    layout: Layout | str,
    config: ImportanceConfig = ImportanceConfig(),
) -> Tensor:
    """Integrated Gradients from the zero code -> ``(B, K)`` (default signed ``sum``).

    With the signed sum, ``sum_k IG_k ~= y(u) - y(0)`` (completeness), up to quadrature error.
    """
    layout = check_codes(codes, layout)
    t = check_targets(targets, codes.shape[0], codes.device)
    alphas, weights = IGRule.parse(config.ig_rule).nodes(config.ig_steps)
    avg = _weighted_gradient_sum(head, codes, t, alphas, weights, config.max_elements)
    return reduce_positions(avg * codes, layout, _reduction(config, Reduction.SUM))


def active_concepts(code: Tensor, layout: Layout | str) -> Tensor:
    """Indices of the concepts that are non-zero somewhere in one image's code (no batch axis)."""
    layout = Layout.parse(layout)
    k_dim = layout.concept_dim - 1
    nonzero = code != 0
    other = tuple(d for d in range(code.ndim) if d != k_dim)
    if other:
        nonzero = nonzero.any(dim=other)
    return torch.nonzero(nonzero).flatten()


def _image_target_fn(
    head: Callable[[Tensor], Tensor], code_1: Tensor, target: int, layout: Layout
) -> Callable[[Tensor], Tensor]:
    def f(masks_MK: Tensor) -> Tensor:
        with torch.no_grad():
            logits = head(apply_masks(code_1, masks_MK.to(code_1.device), layout))
        if logits.ndim != 2 or logits.shape[0] != masks_MK.shape[0]:
            raise ValueError(f"the head must return (B, C) logits, got {tuple(logits.shape)}")
        return target_logits(logits, target)

    return f


def sobol_total_indices(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor | int,
    layout: Layout | str,
    config: ImportanceConfig = ImportanceConfig(),
    progress: bool = False,
    concepts: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Sobol total indices of concept-wise masks on each image's code -> ``(B, K)``.

    The perturbation multiplies concept ``k`` by ``m_k`` in [0, 1) at every position (CRAFT's
    "inpainting towards 0"); the design streams through the head in chunks of the memory budget.
    ``concepts`` restricts the estimate to those concepts (the others get 0); the design, and
    hence each estimated index, is the same as without the restriction.
    """
    layout = check_codes(codes, layout)
    t = check_targets(targets, codes.shape[0], codes.device)
    # One code through the head first: a target the head does not have fails now, not after
    # hours of designs (nor passes for an image whose concepts are all inactive and skipped).
    with torch.no_grad():
        target_logits(check_logits(head(codes[:1]), 1).expand(codes.shape[0], -1), t)
    k = codes.shape[layout.concept_dim]
    chunk = rows_per_chunk(tuple(codes.shape[1:]), config.max_elements)
    out = torch.zeros(codes.shape[0], k, dtype=codes.dtype, device=codes.device)
    wanted = torch.ones(k, dtype=torch.bool, device=codes.device)
    if concepts is not None:
        sel = torch.as_tensor(concepts, dtype=torch.long, device=codes.device).flatten()
        if sel.numel() and (sel.min() < 0 or sel.max() >= k):
            raise ValueError(f"concepts must lie in [0, {k})")
        wanted = torch.zeros_like(wanted)
        wanted[sel] = True
    for b in tqdm(range(codes.shape[0]), desc="sobol", disable=not progress, leave=False):
        code_1 = codes[b : b + 1]
        keep = wanted.clone()
        if config.skip_inactive:
            active = torch.zeros_like(keep)
            active[active_concepts(code_1[0], layout)] = True
            keep &= active
        idx = torch.nonzero(keep).flatten()
        if idx.numel() == 0:
            continue
        out[b] = jansen_total_indices(
            _image_target_fn(head, code_1, int(t[b]), layout),
            k,
            config.sobol_designs,
            sequence=config.sobol_sequence,
            scramble=config.sobol_scramble,
            seed=config.seed,
            indices=idx,
            chunk_rows=chunk,
            device=codes.device,
        ).to(codes.dtype)
    return out


def occlusion(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor | int,
    layout: Layout | str,
    config: ImportanceConfig = ImportanceConfig(),
) -> Tensor:
    """``y(u) - y(u without concept k)`` for every concept -> ``(B, K)``."""
    layout = check_codes(codes, layout)
    t = check_targets(targets, codes.shape[0], codes.device)
    k = codes.shape[layout.concept_dim]
    out = torch.zeros(codes.shape[0], k, dtype=codes.dtype, device=codes.device)
    for b in range(codes.shape[0]):
        idx = (
            active_concepts(codes[b], layout)
            if config.skip_inactive
            else torch.arange(k, device=codes.device)
        )

        # Row 0: the unperturbed code; row r >= 1: concept idx[r - 1] zeroed.
        def masks(start: int, stop: int, idx: Tensor = idx) -> Tensor:
            m = torch.ones(stop - start, k, dtype=codes.dtype, device=codes.device)
            rows = torch.arange(start, stop, device=codes.device)
            hit = rows >= 1
            m[torch.nonzero(hit).flatten(), idx[rows[hit] - 1]] = 0
            return m

        image_index = torch.full((idx.numel() + 1,), b, dtype=torch.long)
        ys = torch.cat(
            [
                target_logits(logits, int(t[b]))
                for _, _, logits in evaluate_masked(
                    head, codes, layout, image_index, masks, config.max_elements
                )
            ]
        )
        out[b, idx] = (ys[0] - ys[1:]).to(codes.dtype)
    return out


def random_importance(codes: Tensor, layout: Layout | str, seed: int = 0) -> Tensor:
    """I.i.d. uniform scores ``(B, K)``: a random deletion order per image (the floor)."""
    layout = check_codes(codes, layout)
    gen = torch.Generator().manual_seed(seed)
    shape = (codes.shape[0], codes.shape[layout.concept_dim])
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(codes.device, codes.dtype)


def _reduce_contributions(
    contributions: Tensor, codes: Tensor, layout: Layout, config: ImportanceConfig
) -> Tensor:
    k = codes.shape[layout.concept_dim]
    if contributions.shape == codes.shape:
        return reduce_positions(contributions, layout, _reduction(config, Reduction.SUM))
    if contributions.shape == (codes.shape[0], k):
        return contributions
    raise ValueError(
        f"contributions must have the shape of the codes {tuple(codes.shape)} or "
        f"(B, K) = {(codes.shape[0], k)}, got {tuple(contributions.shape)}"
    )


def local_importance(
    measure: Measure | str,
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor | int,
    layout: Layout | str,
    config: ImportanceConfig = ImportanceConfig(),
    contributions: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Importance ``(B, K)`` of every concept for each image's target logit under ``measure``.

    ``contributions`` is required for ``Measure.CONTRIBUTION`` (FaCT Eq. 9: per position with
    the codes' shape, or already per concept ``(B, K)``), and ignored otherwise.
    """
    measure = Measure.parse(measure)
    layout = check_codes(codes, layout)
    if measure is Measure.CONTRIBUTION:
        if contributions is None:
            raise ValueError("measure 'contribution' needs the model's contributions tensor")
        return _reduce_contributions(contributions.to(codes.device), codes, layout, config)
    if measure is Measure.RANDOM:
        return random_importance(codes, layout, config.seed)
    if measure is Measure.SOBOL:
        return sobol_total_indices(head, codes, targets, layout, config, progress)
    fn = {
        Measure.SALIENCY: saliency,
        Measure.GRADIENT_X_INPUT: gradient_x_input,
        Measure.INTEGRATED_GRADIENTS: integrated_gradients,
        Measure.OCCLUSION: occlusion,
    }[measure]
    return fn(head, codes, targets, layout, config)


def class_importance(importance_BK: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Global importance: the mean of the local importances over each class's images.

    Returns the sorted classes ``(C',)`` and their importance ``(C', K)``.
    """
    labels = torch.as_tensor(labels, device=importance_BK.device).long()
    if importance_BK.ndim != 2 or labels.shape != (importance_BK.shape[0],):
        raise ValueError(
            f"need importance (B, K) and labels (B,), got {tuple(importance_BK.shape)} and "
            f"{tuple(labels.shape)}"
        )
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    sums = torch.zeros(classes.numel(), importance_BK.shape[1], dtype=importance_BK.dtype)
    sums = sums.to(importance_BK.device).index_add_(0, inverse, importance_BK)
    counts = torch.bincount(inverse, minlength=classes.numel()).to(importance_BK.dtype)
    return classes, sums / counts[:, None]


def expand_class_importance(classes: Tensor, importance_CK: Tensor, labels: Tensor) -> Tensor:
    """Per-image rows ``(B, K)`` of a class-level importance, looked up by each image's label."""
    labels = torch.as_tensor(labels, device=classes.device).long()
    pos = torch.searchsorted(classes, labels)
    pos = pos.clamp(max=classes.numel() - 1)
    if not bool((classes[pos] == labels).all()):
        missing = sorted(set(labels.tolist()) - set(classes.tolist()))
        raise ValueError(f"no class importance for labels {missing[:10]}")
    return importance_CK[pos]
