"""Strict, pickle-free serialization: ``config.json`` + ``model.safetensors`` + model card.

Loading never unpickles (safetensors only), builds the model from ``config.json`` and then
requires the weight file to hold exactly the tensors, shapes and dtypes that config implies
(the Hugging Face mixin's default is non-strict loading; this module never is).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from topk_sae.fileio import atomic_save_tensors, atomic_write_text, load_tensors, read_json

if TYPE_CHECKING:
    from topk_sae.sae import BiasFreeTopKSAE

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


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


def _resolve(
    name_or_path: str | Path, filename: str, revision: str | None, cache_dir: Any, token: Any
) -> Path:
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: not a directory written by save_pretrained"
            )
        return path
    if str(name_or_path).count("/") != 1 or local.suffix:
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local directory nor a Hub repository id ('owner/name')"
        )
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            repo_id=str(name_or_path),
            filename=filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
        )
    )


def model_from_config(config: dict[str, Any]) -> BiasFreeTopKSAE:
    """Build an (uninitialised-weights) model from a ``config.json`` dict, checking it."""
    from topk_sae.sae import BiasFreeTopKSAE

    if config.get("model_type") != BiasFreeTopKSAE.model_type:
        raise ValueError(
            f"config.json has model_type={config.get('model_type')!r}, expected "
            f"{BiasFreeTopKSAE.model_type!r}"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"unsupported format_version {config.get('format_version')!r} (this topk-sae "
            f"reads version {FORMAT_VERSION})"
        )
    missing = [key for key in ("d_in", "n_latents", "k") if key not in config]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    return BiasFreeTopKSAE(int(config["d_in"]), int(config["n_latents"]), int(config["k"]))


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


def from_pretrained(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    map_location: str | torch.device = "cpu",
) -> BiasFreeTopKSAE:
    """Load strictly from a local directory or a Hub repository id (never unpickles)."""
    config_path = _resolve(name_or_path, CONFIG_NAME, revision, cache_dir, token)
    weights_path = _resolve(name_or_path, WEIGHTS_NAME, revision, cache_dir, token)
    config = read_json(config_path)
    model = model_from_config(config)
    load_state_strict(model, load_tensors(weights_path), str(weights_path))
    scale = float(model.input_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{weights_path}: input_scale must be positive and finite, got {scale}")
    return model.to(map_location)


def push_to_hub(
    model: BiasFreeTopKSAE,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload bias-free TopK SAE",
    metadata: dict[str, Any] | None = None,
    api: Any = None,
) -> str:
    """Save to a temporary directory and upload it to a Hub model repo (created if needed)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, metadata=metadata)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message, repo_type="model"
        )
    return str(info)
