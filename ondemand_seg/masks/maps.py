"""Mask math: pure functions from class-token attention maps to label masks.

Shapes: ``B`` images, ``K`` class slots per image (several classes can share a prompt),
``h×w`` an attention grid, ``H×W`` the image.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..settings.config import MASK_AGGREGATIONS as AGGREGATIONS
from ..settings.config import MASK_RESCALINGS as RESCALINGS
from ..settings.config import SELF_ATTENTION_STOPS
from ..settings.label_spaces import IGNORE_INDEX


def normalize_maps(maps: torch.Tensor, mode: str = "max", eps: float = 1e-8) -> torch.Tensor:
    """Scale each map to [0, 1] over its spatial dims, from its finite values only.

    Args:
        maps: ``[..., h, w]`` non-negative attention.
        mode: ``"max"`` divides by the peak (the DiffuMask authors' choice, keeps the zero point);
            ``"minmax"`` also subtracts the minimum; ``"median"`` subtracts the median instead and
            clips below it to 0, removing the floor of attention a class token spreads over the
            whole image (an object covering less than half the image leaves the median on it).
    Returns:
        ``[..., h, w]`` in [0, 1] where ``maps`` is finite and NaN where it is not; an all-constant
        map becomes all zeros under ``"minmax"`` and ``"median"``.
    """
    if mode not in ("max", "minmax", "median"):
        raise ValueError(f"normalization must be 'max', 'minmax' or 'median', got {mode!r}")
    flat = (maps if maps.is_floating_point() else maps.float()).flatten(-2)
    finite = torch.isfinite(flat)
    # The peak and floor come from finite values, so one NaN or inf pixel stays one unknown pixel
    # instead of turning the whole map into NaN (or every other pixel into 0).
    values = torch.where(finite, flat, torch.zeros_like(flat))
    high = torch.where(finite, flat, torch.full_like(flat, -torch.inf)).amax(-1, keepdim=True)
    if mode == "minmax":
        low = torch.where(finite, flat, torch.full_like(flat, torch.inf)).amin(-1, keepdim=True)
    elif mode == "median":
        # nanmedian skips the unknown pixels; a map with none known keeps a NaN floor, zeroed below.
        low = torch.where(finite, flat, torch.full_like(flat, torch.nan)).nanmedian(-1, keepdim=True).values
        low = low.nan_to_num(0.0)
        values = values.maximum(low)
    else:
        low = torch.zeros_like(high)
    scaled = (values - low) / (high - low).nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(eps)
    return torch.where(finite, scaled, torch.full_like(flat, torch.nan)).view_as(maps)


def fuse_resolutions(
    maps_by_factor: Mapping[int, torch.Tensor],
    weights: Mapping[int, float],
    size: tuple[int, int],
    normalization: str = "minmax",
) -> torch.Tensor:
    """Weighted multi-resolution fusion of attention maps at image size.

    Args:
        maps_by_factor: latent downsampling factor -> ``[B, K, h_f, w_f]`` attention.
        weights: factor -> weight; factors with no captured map are an error, so a
            misconfigured resolution never silently drops out.
        size: ``(H, W)`` of the output.
    Returns:
        ``[B, K, H, W]`` fused maps, normalized again so the threshold is relative to the peak.
    """
    def level(maps: torch.Tensor) -> torch.Tensor:
        return F.interpolate(normalize_maps(maps.float(), normalization), size=size, mode="bilinear", align_corners=False)

    return normalize_maps(_weighted_mean(maps_by_factor, weights, level), normalization)


def _weighted_mean(maps_by_factor: Mapping[int, torch.Tensor], weights: Mapping[int, float],
                   level: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sum_f weight_f * level(maps_by_factor[f]) / sum_f weight_f`` over the factors weighted > 0."""
    # Factors with no captured map are an error, so a misconfigured resolution never silently drops out.
    missing = sorted(f for f, w in weights.items() if w > 0 and f not in maps_by_factor)
    if missing:
        raise ValueError(
            f"no cross-attention was captured at latent factor(s) {missing}; "
            f"captured factors: {sorted(maps_by_factor)}. Adjust MaskConfig.resolution_weights."
        )
    total = sum(w for w in weights.values() if w > 0)
    return sum(level(maps_by_factor[f]) * (w / total) for f, w in weights.items() if w > 0)


def neglected_classes(
    maps_by_factor: Mapping[int, torch.Tensor],
    weights: Mapping[int, float],
    class_ids: torch.Tensor,
    ratio: float,
) -> torch.Tensor:
    """Class slots the model did not draw: attention peak below ``ratio`` × the image's strongest.

    A slot's peak is the weighted mean, over the fused grids, of its raw (unnormalised) map's
    maximum, the per-token maximum Attend-and-Excite (Chefer et al. 2023) uses to find neglected
    subjects. Normalisation would stretch a neglected class's faint map to [0, 1] and label a
    sliver of the other object with it; the raw peak, compared across the classes of one prompt,
    is scale-free. A slot with no finite value is never called neglected (its pixels stay
    unknown), and the strongest slot never is.

    Args:
        maps_by_factor: latent factor -> ``[B, K, h_f, w_f]`` raw attention (non-negative).
        weights: factor -> weight, as for :func:`fuse_resolutions`.
        class_ids: ``[B, K]`` label ids; 0 marks an unused slot.
        ratio: in [0, 1); 0 calls nothing neglected.
    Returns:
        ``[B, K]`` bool, True where a used slot is neglected.
    """
    used = class_ids > 0
    if ratio <= 0:
        return torch.zeros_like(used)

    def level(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.float().flatten(2)
        return torch.where(torch.isfinite(flat), flat, torch.full_like(flat, -torch.inf)).amax(-1)

    peak = _weighted_mean(maps_by_factor, weights, level).to(class_ids.device)
    # A slot without a finite peak (-inf: no finite value) is kept and does not count as strongest.
    known = used & torch.isfinite(peak)
    strongest = torch.where(known, peak, torch.full_like(peak, -torch.inf)).amax(1, keepdim=True)
    return known & (peak < ratio * strongest)


def labels_from_maps(
    fused: torch.Tensor,
    class_ids: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_band: float,
) -> torch.Tensor:
    """Binarize fused maps into one label mask per image.

    A pixel goes to the class whose normalised attention is highest among the classes that reach
    ``threshold - ignore_band``; it is labelled with that class at or above ``threshold +
    ignore_band``, ignore (255) inside the band, and background (0) when no class reaches the band.
    A pixel where any used slot's map is not finite is ignore (255): the class it would have
    gone to is unknown.

    Args:
        fused: ``[B, K, H, W]`` maps in [0, 1], NaN where unknown.
        class_ids: ``[B, K]`` long label ids; 0 marks an unused slot.
        thresholds: ``[B, K]`` per-slot threshold γ.
        ignore_band: half-width of the uncertain band around γ, >= 0.
    Returns:
        ``[B, H, W]`` long mask of label ids, 0 background, 255 ignore.
    """
    if not math.isfinite(ignore_band) or ignore_band < 0:
        raise ValueError(f"ignore_band must be a finite number >= 0, got {ignore_band}")
    if not torch.isfinite(thresholds).all():
        raise ValueError(f"thresholds must be finite, got {thresholds.tolist()}")
    thresholds = thresholds.to(fused)[..., None, None]
    used = (class_ids > 0)[..., None, None]
    candidate = used & (fused >= thresholds - ignore_band)
    score = torch.where(candidate, fused, torch.full_like(fused, -1.0))
    best, slot = score.max(dim=1)
    best_threshold = thresholds.squeeze(-1).squeeze(-1).gather(1, slot.flatten(1)).view_as(best)
    best_class = class_ids.gather(1, slot.flatten(1)).view_as(best)
    ignore = torch.full_like(best_class, IGNORE_INDEX)
    labels = torch.where(best >= best_threshold + ignore_band, best_class, ignore)
    labels = torch.where(best < 0, torch.zeros_like(labels), labels)
    unknown = (used & ~torch.isfinite(fused)).any(dim=1)
    return torch.where(unknown, ignore, labels)


def otsu_thresholds(maps: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Per-map Otsu threshold: the cut that maximises between-class variance of the map's values.

    Args:
        maps: ``[B, K, H, W]`` in [0, 1]; non-finite pixels take no part.
    Returns:
        ``[B, K]`` thresholds in (0, 1), one per map, chosen without any labels.
    """
    flat = maps.flatten(2)
    finite = torch.isfinite(flat)
    flat = torch.where(finite, flat, torch.zeros_like(flat)).clamp(0, 1)
    index = (flat * (bins - 1)).round().long()
    hist = torch.zeros(*flat.shape[:2], bins, device=maps.device).scatter_add_(2, index, finite.float())
    prob = hist / hist.sum(-1, keepdim=True).clamp_min(1)
    centers = torch.linspace(0, 1, bins, device=maps.device)
    weight_low = prob.cumsum(-1)
    mean_low = (prob * centers).cumsum(-1)
    mean_all = mean_low[..., -1:]
    between = (mean_all * weight_low - mean_low) ** 2 / (weight_low * (1 - weight_low)).clamp_min(1e-12)
    between = between[..., :-1]
    # Cuts through empty bins tie; take the middle of the tied run rather than its first bin.
    tied = between >= between.amax(-1, keepdim=True) * (1 - 1e-6)
    cut = (tied * centers[:-1]).sum(-1) / tied.sum(-1)
    return (cut + 0.5 / (bins - 1)).clamp(1e-3, 1 - 1e-3)


def calibrate_threshold(maps: list[torch.Tensor], truths: list[torch.Tensor], candidates: torch.Tensor | None = None) -> float:
    """The γ that maximises IoU of ``map >= γ`` against labelled truth, over a small labelled set.

    Args:
        maps: fused maps ``[H, W]`` in [0, 1] of one class.
        truths: the matching boolean masks ``[H, W]`` of that class.
        candidates: thresholds to try (default 0.10, 0.12, ..., 0.90).
    """
    if not maps or len(maps) != len(truths):
        raise ValueError(f"need as many truths as maps (got {len(maps)} maps, {len(truths)} truths)")
    candidates = torch.linspace(0.1, 0.9, 41) if candidates is None else candidates
    values = torch.cat([m.flatten() for m in maps])
    truth = torch.cat([t.flatten() for t in truths]).bool()
    # A non-finite pixel says nothing about where the class is; counting it as "below γ" would
    # bias γ downwards.
    known = torch.isfinite(values)
    values, truth = values[known][None], truth[known][None]
    predicted = values >= candidates[:, None]
    iou = (predicted & truth).sum(1) / (predicted | truth).sum(1).clamp_min(1)
    return float(candidates[iou.argmax()])


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` moved by ``(dy, dx)`` with edge replication, same shape."""
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def refine_with_affinity(
    maps: torch.Tensor,
    image: torch.Tensor,
    iterations: int = 10,
    dilations: tuple[int, ...] = (1, 2, 4),
    temperature: float = 0.1,
) -> torch.Tensor:
    """Random-walk refinement of attention maps along the image's own colour affinities.

    Each step replaces a pixel's value by an affinity-weighted mean over its neighbours at
    several dilations, the affinity being a softmax of negative colour distance scaled by the
    local colour spread (pixel-adaptive mask refinement, Araslanov & Roth, CVPR 2020). No labels
    are needed: the map's confident regions spread inside colour-coherent regions and stop at
    edges. Written by hand because no dependency provides it.

    Args:
        maps: ``[B, K, H, W]`` attention maps.
        image: ``[B, 3, H, W]`` the generated images (any consistent scale).
    Returns:
        ``[B, K, H, W]`` refined maps, renormalised to [0, 1].
    """
    offsets = [(0, 0)] + [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    image = image.float()
    neighbours = torch.stack([_shift(image, dy, dx) for dy, dx in offsets], dim=2)  # [B, 3, S, H, W]
    distance = (neighbours - image[:, :, None]).abs().mean(1)  # [B, S, H, W]
    spread = neighbours.std(2).mean(1, keepdim=True)  # [B, 1, H, W]
    affinity = torch.softmax(-distance / (spread * temperature + 1e-6), dim=1)
    refined = maps.float()
    for _ in range(iterations):
        refined = sum(affinity[:, None, s] * _shift(refined, dy, dx) for s, (dy, dx) in enumerate(offsets))
    return normalize_maps(refined, "minmax")


# Spread of the entropy weights: a map 0.05 (in normalised entropy) more diffuse than another
# counts e times less. A property of the weighting, not tuned per model.
ENTROPY_TEMPERATURE = 0.05
# Fixed-point rounds of the agreement weights (consensus, correlations, consensus, ...).
AGREEMENT_ROUNDS = 3


def _finite_flat(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``maps`` flattened over its last two dims with non-finite values set to 0, and where they were finite."""
    flat = maps.float().flatten(-2)
    finite = torch.isfinite(flat)
    return torch.where(finite, flat, torch.zeros_like(flat)), finite


def _correlation(maps: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the last dim of ``maps`` ``[..., M, N]`` with ``target`` ``[..., N]``,
    over the ``known`` positions ``[..., M, N]`` only; 0 for a constant map."""
    count = known.sum(-1, keepdim=True).clamp_min(1)
    target = target.unsqueeze(-2).expand_as(maps)
    centred = torch.where(known, maps - (maps * known).sum(-1, keepdim=True) / count, torch.zeros_like(maps))
    target = torch.where(known, target - (target * known).sum(-1, keepdim=True) / count, torch.zeros_like(maps))
    norm = centred.norm(dim=-1) * target.norm(dim=-1)
    return (centred * target).sum(-1) / norm.clamp_min(1e-12)


def head_weights(maps: torch.Tensor, mode: str) -> torch.Tensor:
    """Weights of one resolution's layer-head maps, computed from the maps alone (no labels).

    ``"mean"``: every map 1 (the plain mean). ``"agreement"``: a map's Pearson correlation with the
    weighted mean of all maps (the consensus), starting from the plain mean and recomputed
    :data:`AGREEMENT_ROUNDS` times; a map that disagrees (negative correlation: a head that puts
    the class token's attention away from where the others put it) gets 0. ``"entropy"``:
    ``softmax(-H / T)`` over the maps, ``H`` a map's spatial entropy (as a distribution over
    positions) divided by its maximum, ``T`` :data:`ENTROPY_TEMPERATURE`: peaked maps count more.
    Non-finite pixels take no part in the statistics.

    Args:
        maps: ``[B, K, M, h, w]`` non-negative attention of ``M`` layer-heads.
    Returns:
        ``[B, K, M]`` non-negative weights; a slot whose weights are all 0 gets the plain mean's.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    flat, known = _finite_flat(maps)
    uniform = torch.ones(flat.shape[:-1], device=flat.device)
    if mode == "mean":
        return uniform
    if mode == "entropy":
        share = flat.clamp_min(0) / flat.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-12)
        entropy = -(share * share.clamp_min(1e-12).log()).sum(-1) / math.log(max(flat.shape[-1], 2))
        return torch.softmax(-entropy / ENTROPY_TEMPERATURE, dim=-1)
    weights = uniform
    for _ in range(AGREEMENT_ROUNDS):
        consensus = (weights.unsqueeze(-1) * flat).sum(-2) / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        weights = _correlation(flat, consensus, known).clamp_min(0)
    # No map agreeing with the consensus (all constant, say): keep the plain mean.
    return torch.where(weights.sum(-1, keepdim=True) > 0, weights, uniform)


def aggregate_heads(maps: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """One map per class slot from one resolution's layer-head maps, weighted by :func:`head_weights`.

    Args:
        maps: ``[B, K, M, h, w]`` attention of ``M`` layer-heads (mean over the recorded steps).
    Returns:
        ``[B, K, h, w]`` the weighted mean; a pixel non-finite in a map with weight > 0 stays non-finite.
    """
    weights = head_weights(maps, mode)[..., None, None].to(maps.device)
    # 0 * nan is nan: a head weighted 0 must drop out entirely, its unknown pixels included.
    terms = torch.where(weights > 0, weights * maps.float(), torch.zeros_like(maps, dtype=torch.float32))
    return terms.sum(2) / weights.sum(2).clamp_min(1e-12)


def rescale_token_mass(mass: torch.Tensor, weights: torch.Tensor, mode: str = "none", eps: float = 1e-12) -> torch.Tensor:
    """Class maps from the attention mass each position puts on each text token.

    ``"none"``: a class's map is its tokens' mass (the plain map). ``"tokens"`` (GoCA's per-pixel
    rescaling, Meng et al., CVPR 2026): each token's map is first divided by its own mean over the
    positions, so that tokens whose scores run on different scales (a start token that takes mass
    everywhere, a class word that takes it in places) are compared on one footing; a class's map is
    then its tokens' share of the rescaled mass at each position. ``"classes"``: the same rescaling
    among the prompt's class slots only, times the position's objectness (the mean raw mass of the
    used slots): where an object is comes from the raw mass, which class it is from the rescaled
    shares; with one class per prompt it is the plain map.

    Args:
        mass: ``[B, H, N, T]`` per-head softmax mass of ``N`` image positions on ``T`` text tokens.
        weights: ``[B, K, T]`` 1 where token ``t`` names class slot ``k`` (a row of 0s: unused slot).
    Returns:
        ``[B, H, K, N]`` class maps, non-negative.
    """
    if mode not in RESCALINGS:
        raise ValueError(f"token_rescaling must be one of {RESCALINGS}, got {mode!r}")
    mass, weights = mass.float(), weights.float()
    plain = torch.einsum("bhnt,bkt->bhkn", mass, weights)
    if mode == "none":
        return plain
    if mode == "tokens":
        scaled = mass / mass.mean(2, keepdim=True).clamp_min(eps)
        share = scaled / scaled.sum(-1, keepdim=True).clamp_min(eps)
        return torch.einsum("bhnt,bkt->bhkn", share, weights)
    used = (weights.sum(-1) > 0).float()[:, None, :, None]  # [B, 1, K, 1]
    scaled = plain / plain.mean(-1, keepdim=True).clamp_min(eps) * used
    share = scaled / scaled.sum(2, keepdim=True).clamp_min(eps)
    objectness = (plain * used).sum(2, keepdim=True) / used.sum(2, keepdim=True).clamp_min(1)
    return objectness * share


def separation(maps: torch.Tensor) -> torch.Tensor:
    """How two-sided each map is: Otsu's between-class variance over the total variance (η, in
    [0, 1]) at the map's own Otsu cut, of the map scaled to [0, 1].

    Args:
        maps: ``[B, K, N]`` (any non-negative scale).
    Returns:
        ``[B, K]``; 0 for a constant map.
    """
    low, high = maps.amin(-1, keepdim=True), maps.amax(-1, keepdim=True)
    scaled = (maps - low) / (high - low).clamp_min(1e-12)
    cut = otsu_thresholds(scaled.unsqueeze(-1)).unsqueeze(-1)
    upper = scaled >= cut
    share = upper.float().mean(-1)
    mean_upper = (scaled * upper).sum(-1) / upper.sum(-1).clamp_min(1)
    mean_lower = (scaled * ~upper).sum(-1) / (~upper).sum(-1).clamp_min(1)
    between = share * (1 - share) * (mean_upper - mean_lower) ** 2
    return between / scaled.var(-1, unbiased=False).clamp_min(1e-12) * (high - low).squeeze(-1).gt(0)


def sharpen_attention(self_attention: torch.Tensor, sharpness: float = 1.0) -> torch.Tensor:
    """Entropy-reduced self-attention: each row raised to ``sharpness`` and renormalised.

    The same as the softmax of the row's log-probabilities at temperature ``1 / sharpness``, so a
    row's entropy falls as ``sharpness`` grows and its order is kept: the weak, far-reaching
    attention (the "irrelevant global information" iSeg, Sun et al. 2024, removes by gradient
    descent on the entropy) fades first. ``sharpness`` 1 returns the rows unchanged.

    Args:
        self_attention: ``[B, N, N]`` row-stochastic.
    Returns:
        ``[B, N, N]`` row-stochastic.
    """
    if sharpness == 1:
        return self_attention.float()
    tiny = torch.finfo(torch.float32).tiny
    return torch.softmax(sharpness * self_attention.float().clamp_min(tiny).log(), dim=-1)


def propagate_self_attention(cross: torch.Tensor, self_attention: torch.Tensor, power: int = 1,
                             sharpness: float = 1.0, stop: str = "fixed") -> torch.Tensor:
    """Spread cross-attention along the UNet's self-attention: ``A^power · A_cross``, ``A`` the
    self-attention sharpened by :func:`sharpen_attention`.

    ``stop="fixed"`` takes ``power`` steps. ``"separation"`` takes one step, then further steps
    (up to ``power`` in all) for as long as each map's :func:`separation` keeps rising, each map
    stopping on its own: repeated propagation first sharpens a map along the model's segments,
    then blurs it towards the attention's stationary map, and the separation falls when it does.

    Args:
        cross: ``[B, K, N]`` class maps flattened at the self-attention's resolution.
        self_attention: ``[B, N, N]`` row-stochastic self-attention (query rows, key columns).
        power: how many propagation steps (τ), the most with ``"separation"``.
        sharpness: >= 1, the entropy reduction of ``A``.
    Returns:
        ``[B, K, N]`` propagated maps.
    """
    if stop not in SELF_ATTENTION_STOPS:
        raise ValueError(f"self_attention_stop must be one of {SELF_ATTENTION_STOPS}, got {stop!r}")
    attention = sharpen_attention(self_attention, sharpness)

    def step(maps: torch.Tensor) -> torch.Tensor:
        return torch.bmm(attention, maps.transpose(1, 2)).transpose(1, 2)

    out = step(cross.float())
    if stop == "fixed":
        for _ in range(power - 1):
            out = step(out)
        return out
    going = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
    score = separation(out)
    for _ in range(power - 1):
        candidate = step(out)
        candidate_score = separation(candidate)
        going = going & (candidate_score > score)
        if not going.any():
            break
        out = torch.where(going.unsqueeze(-1), candidate, out)
        score = torch.where(going, candidate_score, score)
    return out
