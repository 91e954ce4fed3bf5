"""Strict, pickle-free serialization: ``config.json`` + ``model.safetensors`` + model card.

Files come from a local directory or, through ``huggingface_hub`` itself
(``hf_hub_download``: its cache, ``HF_HUB_OFFLINE``, tokens, revisions, subfolders), from a Hub
model repository; uploads are one ``HfApi.upload_folder`` commit. Loading never unpickles
(safetensors only), validates ``config.json`` field by field, requires the weight file to hold
exactly the tensors and shapes that config implies (the Hugging Face mixin's default is
non-strict loading; this module never is) and checks the weights themselves.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from topk_sae.fileio import atomic_save_tensors, atomic_write_text, load_tensors, read_json

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi

    from topk_sae.sae import BiasFreeTopKSAE

SAE = TypeVar("SAE", bound="BiasFreeTopKSAE")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
ATOM_NORM_TOLERANCE = 1e-3
"""Largest accepted ``| ||atom|| - 1 |`` on load (training keeps atoms unit to ~1e-7; the
slack admits weights stored in half precision)."""

_CONFIG_FIELDS: dict[str, type] = {
    "model_type": str,
    "format_version": int,
    "d_in": int,
    "n_latents": int,
    "k": int,
    "metadata": dict,
}
"""Every field of ``config.json`` and its exact JSON type (``metadata`` is optional)."""
_KIND_NAMES = {str: "string", int: "integer", dict: "object"}


def model_card(model: BiasFreeTopKSAE, metadata: dict[str, Any] | None) -> str:
    meta = json.dumps(metadata, indent=2, sort_keys=True) if metadata else "{}"
    return (
        "---\nlibrary_name: topk-sae\ntags:\n- sparse-autoencoder\n- topk-sae\n"
        "- interpretability\n---\n\n"
        f"# Bias-free TopK SAE ({model.n_latents} latents, k={model.k}, d_in={model.d_in})\n\n"
        "A sparse autoencoder without any bias: `code = TopK(ReLU(W_enc x / s))`, "
        "`x_hat = s * sum(value * atom)` with unit-norm atoms (rows of `W_dec`) and the global "
        f"input scale `s = {float(model.input_scale):.6g}` stored in the weights, so the model "
        "takes raw (unscaled) features.\n\n"
        "```python\nfrom topk_sae import BiasFreeTopKSAE\n"
        "sae = BiasFreeTopKSAE.from_pretrained('<this repo or directory>')\n"
        "recon, code = sae(features_ND)  # or sae.forward_map(maps_BCHW)\n```\n\n"
        f"## Training metadata\n\n```json\n{meta}\n```\n"
    )


def save_pretrained(
    model: BiasFreeTopKSAE, save_directory: str | Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` (each atomically)."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": model.model_type,
        "format_version": FORMAT_VERSION,
        **model.config,
        "metadata": metadata or {},
    }
    atomic_save_tensors(dict(model.state_dict()), out / WEIGHTS_NAME)
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / CARD_NAME, model_card(model, metadata))
    return out


def load_state_strict(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: str
) -> None:
    """Copy ``tensors`` into ``model``, requiring exactly its keys, shapes and float dtypes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{origin} does not match the model: missing tensors {missing}, unexpected "
            f"tensors {unexpected}"
        )
    for key, ref in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(
                f"{origin}: tensor {key!r} has shape {tuple(got.shape)} but the config implies "
                f"{tuple(ref.shape)} -- config.json and the weights do not belong together"
            )
        if not got.dtype.is_floating_point:
            raise ValueError(f"{origin}: tensor {key!r} has non-float dtype {got.dtype}")
    model.load_state_dict(tensors, strict=True)


def validate_config(config: Any, origin: str) -> dict[str, Any]:
    """Check a ``config.json`` dict field by field (exact JSON types, no unknown keys).

    ``k: 2.9``, ``k: "2"`` or ``k: 2.0`` are refused rather than converted, and so is a key
    this version does not know (a config from another library or a newer format would
    otherwise load as something it is not).
    """
    if not isinstance(config, dict):
        raise ValueError(f"{origin}: config.json must hold a JSON object, got {config!r}")
    unknown = sorted(set(config) - set(_CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"{origin}: unknown config.json fields {unknown}; this topk-sae reads exactly "
            f"{sorted(_CONFIG_FIELDS)} (written by save_pretrained)"
        )
    missing = sorted(set(_CONFIG_FIELDS) - set(config) - {"metadata"})
    if missing:
        raise ValueError(f"{origin}: config.json lacks the fields {missing}")
    for key, kind in _CONFIG_FIELDS.items():
        if key not in config:
            continue
        value = config[key]
        # bool is an int subclass in Python, but `true` is no size.
        if type(value) is not kind:
            raise ValueError(
                f"{origin}: config.json field {key!r} must be a JSON {_KIND_NAMES[kind]}, got "
                f"{value!r} ({type(value).__name__})"
            )
    return config


def check_weights(model: BiasFreeTopKSAE, origin: str) -> None:
    """Refuse weights a trained bias-free TopK SAE cannot have: non-finite entries, atoms (rows
    of ``W_dec``) whose norm is not 1 within ``ATOM_NORM_TOLERANCE`` (training keeps them unit),
    or an ``input_scale`` that is not a positive finite number."""
    for name, tensor in model.state_dict().items():
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{origin}: tensor {name!r} holds {bad} NaN/Inf entries")
    scale = float(model.input_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{origin}: input_scale must be positive and finite, got {scale}")
    norms = model.W_dec.detach().double().norm(dim=1)
    worst = int((norms - 1).abs().argmax())
    if abs(float(norms[worst]) - 1) > ATOM_NORM_TOLERANCE:
        raise ValueError(
            f"{origin}: atom {worst} (row of W_dec) has norm {float(norms[worst]):.6g}, but the "
            f"atoms of a bias-free TopK SAE are unit vectors (tolerance {ATOM_NORM_TOLERANCE}); "
            "renormalise with model.normalize_atoms_() (and rescale the codes) before saving"
        )


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("/", ".", "~")) or "\\" in name or os.sep in name.replace("/", ""):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_files(
    name_or_path: str | os.PathLike[str],
    filenames: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME),
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str | None = None,
) -> dict[str, Path]:
    """Local paths of ``filenames`` in a directory or a Hub model repository.

    An existing directory is used as is (the Hub arguments are then ignored); a ``Path``, or a
    string that is not a valid repository id (absolute, ``./``-relative, several ``/``...),
    must be an existing directory; anything else is a Hub repository id, fetched with
    ``huggingface_hub.hf_hub_download`` (its cache, offline mode and authentication).
    """
    local = Path(name_or_path).expanduser()
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        paths = {name: local / name for name in filenames}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{missing} not found: {local} is not a directory written by save_pretrained"
            )
        return paths
    if local.exists():
        raise FileNotFoundError(
            f"{local} is a file, not a model directory: pass the directory that holds "
            f"{' and '.join(filenames)}"
        )
    if isinstance(name_or_path, os.PathLike) or not _looks_like_repo_id(str(name_or_path)):
        raise FileNotFoundError(
            f"local directory {local} not found (and {str(name_or_path)!r} is not a Hub "
            "repository id 'owner/name')"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from topk_sae import __version__

    repo_id = str(name_or_path)
    out = {}
    for name in filenames:
        try:
            out[name] = Path(
                hf_hub_download(
                    repo_id,
                    name,
                    subfolder=subfolder,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                    library_name="topk-sae",
                    library_version=__version__,
                )
            )
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
            where = f"{subfolder}/{name}" if subfolder else name
            raise FileNotFoundError(
                f"{where} of Hub repository {repo_id!r} (revision {revision or 'main'}) not "
                f"found, and there is no local directory {local}: {err}"
            ) from err
    return out


def from_pretrained(
    cls: type[SAE],
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str | None = None,
    map_location: str | torch.device = "cpu",
) -> SAE:
    """Load an instance of ``cls`` strictly from a directory or a Hub repository (never
    unpickles): validated ``config.json``, exactly the tensors and shapes it implies, checked
    weights (:func:`check_weights`)."""
    paths = resolve_files(
        name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        token=token,
        subfolder=subfolder,
    )
    config_path, weights_path = paths[CONFIG_NAME], paths[WEIGHTS_NAME]
    config = validate_config(read_json(config_path), str(config_path))
    if config["model_type"] != cls.model_type:
        raise ValueError(
            f"{config_path} has model_type={config['model_type']!r}, expected {cls.model_type!r}"
        )
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: unsupported format_version {config['format_version']!r} (this "
            f"topk-sae reads version {FORMAT_VERSION})"
        )
    try:
        model = cls(config["d_in"], config["n_latents"], config["k"])
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from err
    load_state_strict(model, load_tensors(weights_path), str(weights_path))
    check_weights(model, str(weights_path))
    return model.to(map_location)


def push_to_hub(
    model: BiasFreeTopKSAE,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    branch: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload bias-free TopK SAE",
    commit_description: str | None = None,
    metadata: dict[str, Any] | None = None,
    api: HfApi | None = None,
) -> CommitInfo:
    """Save to a temporary directory and upload it as one commit to a Hub model repository.

    The repository is created if needed (``private`` applies then). ``branch`` is the target
    branch (created from the default branch if missing; ``None``: the default branch);
    ``create_pr=True`` opens a pull request against it instead of committing. ``api`` is an
    ``HfApi`` to use (e.g. another endpoint). Returns ``huggingface_hub``'s ``CommitInfo``
    (a ``str``, the commit URL, with ``.oid``, ``.pr_url``, ...).
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if branch is not None:
        api.create_branch(repo_id, branch=branch, token=token, repo_type="model", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, metadata=metadata)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            repo_type="model",
            revision=branch,
            create_pr=create_pr,
        )
