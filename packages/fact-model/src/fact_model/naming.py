"""CLIP-Dissect-style naming of concepts (FaCT Sec. 5.3; Oikarinen & Weng, ICLR 2023).

Each concept is named by the word of a vocabulary whose CLIP image-text similarity best matches
the concept's activations on a probe set, scored by CLIP-Dissect's **soft-WPMI**.

API
---
* :func:`soft_wpmi` ``(similarity (N, V), activations (N, K)) -> (K, V)`` — pure scoring,
  tensors in, tensors out (float64).
* :func:`name_from_similarity` ``(similarity, activations, words) ->`` :class:`ConceptNames` —
  best word and score per concept from a precomputed similarity.
* :func:`clip_embeddings` ``(model, processor, images, words, batch_size, device) -> (I, T)``
  — L2-normalised image ``(N, D)`` and text ``(V, D)`` embeddings from any user-supplied CLIP
  (transformers ``CLIPModel`` + ``CLIPProcessor``, or an open_clip model with
  ``processor=(preprocess, tokenizer)``). Nothing is downloaded here: the user loads the model
  (e.g. ``CLIPModel.from_pretrained(local_path)``) and passes the objects.
* :func:`name_concepts` ``(concepts, dataset, words, clip_model, clip_processor, ...)`` —
  presence of a :class:`~fact_model.concepts.LayerConcepts` over a dataset (the codes summed
  over positions) and CLIP embeddings of the same images (the first 3 channels of the B-cos
  input ``[x, 1 - x]``, i.e. the RGB image in [0, 1]), then :func:`name_from_similarity`.

Formula (CLIP-Dissect ``similarity.soft_wpmi``; parameters and defaults from that paper/code)
-------------------------------------------------------------------------------------------
With ``S = similarity`` (cosine image-text similarity, ``N x V``):

* ``P = softmax(a * S, dim=1)`` — per image, a distribution over the V words (``a = 10``).
* For concept ``k`` let ``i_0, ..., i_{q-1}`` be its ``q = top_k`` (``100``) most activated
  images in decreasing order, with soft weights
  ``p_j = p_start - (j / q) * (p_start - p_end)`` (``p_start = 0.998``, ``p_end = 0.97``).
* ``log p(w | k) = sum_j log(1 + p_j * (P[i_j, w] - 1) + min_prob)`` (``min_prob = 1e-7``).
* ``log p(w) = logsumexp_k log p(w | k) - log K``.
* ``score(k, w) = log p(w | k) - lam * log p(w)`` (``lam = 1``); the name is ``argmax_w``.

``top_k`` larger than N is clamped to N (then ``q = N`` in the weights). The ``log p(w)`` term
is the average over the K concepts passed in, so scores depend on the set of concepts scored
together, exactly as in CLIP-Dissect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "ConceptNames",
    "clip_embeddings",
    "name_concepts",
    "name_from_similarity",
    "soft_wpmi",
]


class ConceptNames(NamedTuple):
    """Names of K concepts."""

    names: list[str]
    """The best word per concept."""
    scores: Tensor
    """(K,) float64 soft-WPMI of that word."""
    word_ids: Tensor
    """(K,) int64 index of that word in the vocabulary."""
    matrix: Tensor | None
    """(K, V) float64 soft-WPMI of every word (``None`` unless ``return_matrix``)."""


def _check_2d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values")


def soft_wpmi(
    similarity: Tensor,
    activations: Tensor,
    *,
    top_k: int = 100,
    a: float = 10.0,
    lam: float = 1.0,
    min_prob: float = 1e-7,
    p_start: float = 0.998,
    p_end: float = 0.97,
) -> Tensor:
    """(K, V) float64 soft-WPMI of every word for every concept (formula: module docstring).

    ``similarity``: (N, V) image-text cosine similarity; ``activations``: (N, K) concept
    activation (e.g. presence) of the same N images.
    """
    _check_2d("similarity", similarity)
    _check_2d("activations", activations)
    n, v = similarity.shape
    if activations.shape[0] != n:
        raise ValueError(
            f"similarity has {n} images but activations has {activations.shape[0]} rows"
        )
    if n == 0 or v == 0 or activations.shape[1] == 0:
        raise ValueError(
            f"empty input: similarity {tuple(similarity.shape)}, "
            f"activations {tuple(activations.shape)}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not (0 <= p_end <= 1 and 0 <= p_start <= 1):
        raise ValueError(f"p_start and p_end must be in [0, 1], got {p_start}, {p_end}")
    if min_prob <= 0:
        raise ValueError(f"min_prob must be > 0, got {min_prob}")
    s = similarity.detach().to("cpu", torch.float64)
    act = activations.detach().to("cpu", torch.float64)
    k = act.shape[1]
    q = min(top_k, n)
    prob = torch.softmax(a * s, dim=1)  # (N, V)
    idx = act.topk(q, dim=0).indices.T  # (K, q), decreasing activation
    p_in = p_start - (torch.arange(q, dtype=torch.float64) / q) * (p_start - p_end)  # (q,)
    top_prob = prob[idx]  # (K, q, V)
    log_cond = torch.log1p(p_in[None, :, None] * (top_prob - 1) + min_prob).sum(1)  # (K, V)
    log_prior = torch.logsumexp(log_cond, dim=0) - torch.log(
        torch.tensor(float(k), dtype=torch.float64)
    )
    return log_cond - lam * log_prior[None]


def name_from_similarity(
    similarity: Tensor,
    activations: Tensor,
    words: Sequence[str],
    *,
    return_matrix: bool = False,
    **wpmi_kwargs: Any,
) -> ConceptNames:
    """Best word per concept by :func:`soft_wpmi` (``wpmi_kwargs`` are passed on)."""
    words = list(words)
    if similarity.ndim == 2 and similarity.shape[1] != len(words):
        raise ValueError(f"similarity has {similarity.shape[1]} words but {len(words)} were given")
    m = soft_wpmi(similarity, activations, **wpmi_kwargs)
    scores, ids = m.max(dim=1)
    return ConceptNames([words[i] for i in ids.tolist()], scores, ids, m if return_matrix else None)


# ----------------------------------------------------------------------------- CLIP
def _features(out: Any) -> Tensor:
    """transformers 5 returns a ModelOutput (projected features in ``pooler_output``)."""
    if isinstance(out, Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot read features from {type(out).__name__}")


def _model_device(model: Any, device: Any) -> Any:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be an (N, 3, H, W) RGB tensor in [0, 1], "
            f"got {getattr(images, 'shape', type(images))}"
        )


@torch.no_grad()
def _image_features(model: Any, processor: Any, images: Tensor, device: Any) -> Tensor:
    """(B, D) unnormalised features of RGB images in [0, 1]."""
    _check_images(images)
    images = images.detach().float().cpu().clamp(0, 1)
    if hasattr(model, "get_image_features"):  # transformers
        proc = getattr(processor, "image_processor", processor)
        pix = proc(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
        return _features(model.get_image_features(pixel_values=pix.to(device)))
    if hasattr(model, "encode_image"):  # open_clip: processor = (preprocess, tokenizer)
        from torchvision.transforms.functional import to_pil_image

        preprocess = processor[0]
        pix = torch.stack([preprocess(to_pil_image(im)) for im in images])
        return _features(model.encode_image(pix.to(device)))
    raise TypeError(
        "clip_model needs get_image_features (transformers) or encode_image (open_clip)"
    )


@torch.no_grad()
def _text_features(model: Any, processor: Any, words: list[str], device: Any) -> Tensor:
    if hasattr(model, "get_text_features"):
        tok = getattr(processor, "tokenizer", processor)
        enc = tok(words, padding=True, truncation=True, return_tensors="pt")
        enc = {k: t.to(device) for k, t in enc.items() if k in ("input_ids", "attention_mask")}
        return _features(model.get_text_features(**enc))
    if hasattr(model, "encode_text"):
        return _features(model.encode_text(processor[1](words).to(device)))
    raise TypeError("clip_model needs get_text_features (transformers) or encode_text (open_clip)")


def _normalise(t: Tensor) -> Tensor:
    return torch.nn.functional.normalize(t.float(), dim=-1).cpu()


def _check_words(words: Sequence[str]) -> list[str]:
    if isinstance(words, str):
        raise ValueError("words must be a sequence of strings, not one string")
    words = list(words)
    if not words or not all(isinstance(w, str) and w for w in words):
        raise ValueError("words must be a non-empty sequence of non-empty strings")
    return words


def clip_embeddings(
    model: Any,
    processor: Any,
    images: Tensor,
    words: Sequence[str],
    batch_size: int = 64,
    device: Any = None,
) -> tuple[Tensor, Tensor]:
    """L2-normalised CLIP embeddings: images (N, D) and words (V, D), float32 on the CPU.

    ``images``: (N, 3, H, W) RGB in [0, 1]; each word is encoded as is (CLIP-Dissect uses no
    prompt template). ``model``: a transformers ``CLIPModel`` with its ``CLIPProcessor`` (or a
    tokenizer / image processor pair exposed as ``.tokenizer`` / ``.image_processor``), or an
    open_clip model with ``processor=(preprocess, tokenizer)``. ``device``: where to run
    (default: the model's device). ``similarity = I @ T.T``.
    """
    words = _check_words(words)
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = _model_device(model, device)
    img = [
        _normalise(_image_features(model, processor, images[i : i + batch_size], dev))
        for i in range(0, images.shape[0], batch_size)
    ]
    txt = [
        _normalise(_text_features(model, processor, words[i : i + batch_size], dev))
        for i in range(0, len(words), batch_size)
    ]
    return torch.cat(img), torch.cat(txt)


def name_concepts(
    concepts: Any,
    dataset: Any,
    words: Sequence[str],
    clip_model: Any,
    clip_processor: Any,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
    return_matrix: bool = False,
    **wpmi_kwargs: Any,
) -> ConceptNames:
    """Name the concepts of ``concepts`` (a :class:`~fact_model.concepts.LayerConcepts`) on
    ``dataset`` (optionally the subset ``indices``) as the probe set.

    Activations are ``concepts.presence`` (codes summed over positions); CLIP sees the RGB
    image, the first 3 channels of the B-cos input. Both models run on ``device`` (default:
    where they are). Memory is ``O(N * (K + D))``: images are not kept.
    """
    from fact_model.data import SkipLog, image_loader, iterate

    words = _check_words(words)
    dev = _model_device(clip_model, device)
    txt = torch.cat(
        [
            _normalise(_text_features(clip_model, clip_processor, words[i : i + batch_size], dev))
            for i in range(0, len(words), batch_size)
        ]
    )
    pres, img = [], []
    log = SkipLog()
    loader = image_loader(dataset, batch_size=batch_size, indices=indices)
    for batch in tqdm(
        iterate(loader, log),
        total=len(loader),
        desc=f"naming {concepts.name}",
        disable=not progress,
    ):
        x = batch.images.to(device) if device is not None else batch.images
        with torch.no_grad():
            pres.append(concepts.presence(x).detach().cpu().double())
        img.append(
            _normalise(_image_features(clip_model, clip_processor, batch.images[:, :3], dev))
        )
    if not pres:
        raise ValueError(f"no image could be read ({log.summary()})")
    sim = torch.cat(img) @ txt.T
    return name_from_similarity(
        sim, torch.cat(pres), words, return_matrix=return_matrix, **wpmi_kwargs
    )
