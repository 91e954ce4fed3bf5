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
* :func:`load_clip` ``(spec, device) -> (model, processor)`` — a CLIP from local files only
  (spec: a transformers CLIP folder, ``open_clip:DIR`` or ``open_clip:ARCH:FILE``; see there);
  :func:`check_clip_spec` validates a spec without loading anything.
* :func:`read_vocabulary` ``(path) -> words`` — a text file, one word or phrase per line.
* :func:`save_names` / :func:`load_names` — the ``names_<layer>.json`` files that
  ``fact stats --clip-model ... --vocabulary ...`` writes and ``fact atlas --names`` reads.

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

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "NAMES_FORMAT",
    "OPEN_CLIP_PREFIX",
    "ConceptNames",
    "check_clip_spec",
    "clip_embeddings",
    "load_clip",
    "load_names",
    "name_concepts",
    "name_from_similarity",
    "read_vocabulary",
    "save_names",
    "soft_wpmi",
]

NAMES_FORMAT = "fact-concept-names"
"""The ``format`` field of a ``names_<layer>.json`` file (:func:`save_names`)."""
NAMES_FORMAT_VERSION = 1
OPEN_CLIP_PREFIX = "open_clip:"
"""The prefix of an open_clip spec for :func:`load_clip`."""


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


def _model_dtype(model: Any) -> torch.dtype:
    """The floating dtype of the model's weights (inputs are cast to it; float32 if none)."""
    try:
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    except (AttributeError, TypeError):
        pass
    return torch.float32


def _open_clip_parts(processor: Any) -> tuple[Any, Any]:
    """``(preprocess, tokenizer)`` of an open_clip model, checked."""
    if (
        not isinstance(processor, (tuple, list))
        or len(processor) != 2
        or not all(callable(f) for f in processor)
    ):
        raise TypeError(
            "for an open_clip model, clip_processor must be the pair (preprocess, tokenizer): "
            "the eval transform of open_clip.create_model_and_transforms (its third result) "
            "and open_clip.get_tokenizer(name); got "
            f"{type(processor).__name__}"
        )
    return processor[0], processor[1]


def _to_pil(image: Tensor) -> Any:
    """A (3, H, W) image in [0, 1] as the 8-bit RGB picture an open_clip transform expects."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


@torch.no_grad()
def _image_features(model: Any, processor: Any, images: Tensor, device: Any) -> Tensor:
    """(B, D) unnormalised features of RGB images in [0, 1]."""
    _check_images(images)
    images = images.detach().float().cpu().clamp(0, 1)
    dtype = _model_dtype(model)
    if hasattr(model, "get_image_features"):  # transformers
        proc = getattr(processor, "image_processor", processor)
        pix = proc(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
        return _features(model.get_image_features(pixel_values=pix.to(device, dtype)))
    if hasattr(model, "encode_image"):  # open_clip: processor = (preprocess, tokenizer)
        # open_clip's transforms (Resize, CenterCrop, ToTensor, Normalize) take PIL images, as
        # in its training: each image is rounded to 8 bits and handed over as a picture.
        preprocess, _ = _open_clip_parts(processor)
        pix = torch.stack([preprocess(_to_pil(im)) for im in images])
        return _features(model.encode_image(pix.to(device, dtype)))
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
        _, tokenizer = _open_clip_parts(processor)
        return _features(model.encode_text(tokenizer(words).to(device)))
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
    return torch.cat(img), _word_embeddings(model, processor, words, batch_size, dev)


def _word_embeddings(
    model: Any, processor: Any, words: list[str], batch_size: int, dev: Any
) -> Tensor:
    """(V, D) L2-normalised text embeddings of ``words``, ``batch_size`` at a time."""
    return torch.cat(
        [
            _normalise(_text_features(model, processor, words[i : i + batch_size], dev))
            for i in range(0, len(words), batch_size)
        ]
    )


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
    txt = _word_embeddings(clip_model, clip_processor, words, batch_size, dev)
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


# ----------------------------------------------------------------------------- loading a CLIP
_CLIP_SPEC_HELP = (
    "--clip-model takes a local folder of a transformers CLIP (CLIPModel.save_pretrained and "
    "CLIPProcessor.save_pretrained, e.g. a downloaded openai/clip-vit-base-patch32 snapshot), "
    "open_clip:DIR (a folder with open_clip_config.json and weights) or "
    "open_clip:ARCH:FILE (an open_clip architecture and a local checkpoint file)"
)


class _ClipSpec(NamedTuple):
    kind: str  # "transformers", "open_clip-dir" or "open_clip"
    path: Path  # the folder, or the checkpoint file
    arch: str | None = None


def _parse_clip_spec(spec: str) -> _ClipSpec:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty CLIP model spec; {_CLIP_SPEC_HELP}")
    if not spec.startswith(OPEN_CLIP_PREFIX):
        return _ClipSpec("transformers", Path(spec).expanduser())
    rest = spec[len(OPEN_CLIP_PREFIX) :]
    if rest.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"{spec!r}: nothing is downloaded here; download the model yourself (e.g. "
            "`huggingface-cli download REPO --local-dir DIR`) and pass open_clip:DIR"
        )
    if Path(rest).expanduser().is_dir():
        return _ClipSpec("open_clip-dir", Path(rest).expanduser())
    arch, sep, file = rest.partition(":")
    if not sep or not arch or not file:
        raise FileNotFoundError(
            f"{spec!r}: {rest!r} is not a folder, and not ARCH:FILE either; {_CLIP_SPEC_HELP}"
        )
    return _ClipSpec("open_clip", Path(file).expanduser(), arch)


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            f"open_clip specs need the open-clip-torch package ({err}); "
            "install it (pip install open-clip-torch) or pass a transformers CLIP folder"
        ) from err
    return open_clip


def check_clip_spec(spec: str) -> str:
    """Validate a :func:`load_clip` spec without loading the model; returns what it names.

    Raises ``FileNotFoundError`` / ``ValueError`` / ``ImportError`` with a message that says
    what is wrong and how to fix it (cheap: for failing before a long pass, not after it).
    """
    s = _parse_clip_spec(spec)
    if s.kind == "transformers":
        if not s.path.is_dir():
            raise FileNotFoundError(
                f"CLIP model folder {str(s.path)!r} does not exist (a Hub id is not downloaded "
                f"here: download the snapshot and pass its folder); {_CLIP_SPEC_HELP}"
            )
        config = s.path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"{str(s.path)!r} holds no config.json, so it is no transformers model folder; "
                f"{_CLIP_SPEC_HELP}"
            )
        try:
            model_type = json.loads(config.read_text("utf-8")).get("model_type")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{str(config)!r} is not a valid config file ({err})") from err
        if model_type != "clip":
            raise ValueError(
                f"{str(s.path)!r} holds a {model_type!r} model, not a CLIP (model_type 'clip'); "
                f"{_CLIP_SPEC_HELP}"
            )
        return f"transformers CLIP {s.path.resolve()}"
    open_clip = _import_open_clip()
    if s.kind == "open_clip-dir":
        if not (s.path / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"{str(s.path)!r} holds no open_clip_config.json; {_CLIP_SPEC_HELP}"
            )
        return f"open_clip {s.path.resolve()}"
    if s.arch not in open_clip.list_models():
        raise ValueError(
            f"{s.arch!r} is not an open_clip architecture (see open_clip.list_models(), "
            "e.g. ViT-B-32); the spec is open_clip:ARCH:FILE"
        )
    if not s.path.is_file():
        raise FileNotFoundError(
            f"open_clip checkpoint {str(s.path)!r} does not exist; nothing is downloaded here, "
            "download the weights first and pass open_clip:ARCH:/path/to/checkpoint"
        )
    return f"open_clip {s.arch} {s.path.resolve()}"


def load_clip(spec: str, device: Any = "cpu") -> tuple[Any, Any]:
    """``(model, processor)`` of a CLIP from local files only, in eval mode on ``device``,
    ready for :func:`clip_embeddings` / :func:`name_concepts`. Nothing is downloaded.

    ``spec``:

    * ``PATH`` -- a folder with a transformers CLIP (``config.json`` with ``model_type``
      ``clip``, its weights, and the processor saved by ``CLIPProcessor.save_pretrained``);
      loaded with ``CLIPModel`` / ``CLIPProcessor.from_pretrained(PATH, local_files_only=True)``.
    * ``open_clip:DIR`` -- a folder with ``open_clip_config.json`` and a checkpoint (open_clip's
      ``local-dir:`` format, e.g. a downloaded ``hf-hub`` open_clip repository).
    * ``open_clip:ARCH:FILE`` -- a built-in open_clip architecture (``open_clip.list_models()``)
      with the checkpoint ``FILE`` (loaded with ``weights_only``). An architecture whose
      tokenizer or text tower comes from the Hugging Face Hub reads it from the local cache
      (``local_files_only`` for the tokenizer; set ``HF_HUB_OFFLINE=1`` to be sure).

    For open_clip the processor is ``(preprocess, tokenizer)``: the eval transform and the
    architecture's tokenizer.
    """
    check_clip_spec(spec)
    s = _parse_clip_spec(spec)
    if s.kind == "transformers":
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(str(s.path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a CLIPModel from {str(s.path)!r} ({err})") from err
        try:
            processor = CLIPProcessor.from_pretrained(str(s.path), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"cannot load a CLIPProcessor from {str(s.path)!r} ({err}); save the model's "
                "processor there too: CLIPProcessor.from_pretrained(NAME).save_pretrained(PATH)"
            ) from err
        return model.to(device).eval(), processor
    open_clip = _import_open_clip()
    if s.kind == "open_clip-dir":
        name, pretrained, tok_kwargs = f"local-dir:{s.path}", None, {}
    else:
        name, pretrained = s.arch, str(s.path)
        text_cfg = (open_clip.get_model_config(s.arch) or {}).get("text_cfg", {})
        tok_kwargs = {"local_files_only": True} if text_cfg.get("hf_tokenizer_name") else {}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device
        )
        tokenizer = open_clip.get_tokenizer(name, **tok_kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load the open_clip model {spec!r} ({err})") from err
    return model.eval(), (preprocess, tokenizer)


# ----------------------------------------------------------------------------- files
def read_vocabulary(path: str | os.PathLike[str]) -> list[str]:
    """The words of a vocabulary file: UTF-8 text, one word or phrase per line.

    Surrounding whitespace and blank lines are dropped, repeats are kept once (first
    occurrence). Raises ``FileNotFoundError`` / ``ValueError`` (no words, not UTF-8).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"vocabulary file {str(p)!r} does not exist; give a text file with one word or "
            "phrase per line"
        )
    try:
        text = p.read_text("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"vocabulary file {str(p)!r} is not UTF-8 text ({err})") from err
    words = list(dict.fromkeys(w.strip() for w in text.splitlines() if w.strip()))
    if not words:
        raise ValueError(
            f"vocabulary file {str(p)!r} has no words; write one word or phrase per line "
            "(e.g. CLIP-Dissect's list of common English words)"
        )
    return words


def save_names(
    path: str | os.PathLike[str],
    result: ConceptNames,
    *,
    layer: str,
    kind: str = "sae",
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``names_<layer>.json`` (atomically)::

        {"format": "fact-concept-names", "version": 1, "layer": str, "kind": "sae" | "channels",
         "method": "CLIP-Dissect soft-WPMI", "names": [str] (K), "scores": [float] (K),
         "word_ids": [int] (K), **meta}

    ``meta``: provenance (CLIP model, vocabulary, probe set, ``top_k``), JSON-able.
    """
    from fact_model._atomic import atomic_write_json

    record = {
        "format": NAMES_FORMAT,
        "version": NAMES_FORMAT_VERSION,
        "layer": layer,
        "kind": kind,
        "method": "CLIP-Dissect soft-WPMI",
        **dict(meta or {}),
        "names": list(result.names),
        "scores": [float(v) for v in result.scores.tolist()],
        "word_ids": [int(v) for v in result.word_ids.tolist()],
    }
    return atomic_write_json(path, record)


def load_names(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a :func:`save_names` file; returns its dict (``names``, ``scores``,
    ``layer``, ``kind`` and the provenance fields)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"names file {str(p)!r} does not exist")
    try:
        record = json.loads(p.read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"names file {str(p)!r} is not valid JSON ({err})") from err
    if not isinstance(record, dict) or record.get("format") != NAMES_FORMAT:
        raise ValueError(
            f"{str(p)!r} is not a concept names file (format {NAMES_FORMAT!r}, written by "
            "fact stats --clip-model ... --vocabulary ...)"
        )
    if record.get("version") != NAMES_FORMAT_VERSION:
        raise ValueError(
            f"{str(p)!r} has names format version {record.get('version')!r}; this fact-model "
            f"reads version {NAMES_FORMAT_VERSION}"
        )
    names, scores = record.get("names"), record.get("scores")
    if not isinstance(record.get("layer"), str) or record.get("kind") not in ("sae", "channels"):
        raise ValueError(f"{str(p)!r} needs a string 'layer' and a 'kind' of sae or channels")
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) and n for n in names)
        or not isinstance(scores, list)
        or len(scores) != len(names)
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in scores
        )
    ):
        raise ValueError(
            f"{str(p)!r} needs 'names' (non-empty strings) and as many finite 'scores'"
        )
    return record
