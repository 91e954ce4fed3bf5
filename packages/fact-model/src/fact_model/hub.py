"""Save, load and share a whole FaCT model: safetensors + ``config.json`` + a model card.

A FaCT directory (or Hub model repository)::

    config.json               # model_type "fact", backbone spec, layers, input transform
    README.md                 # model card: layers, SAE sizes, accuracy, training data
    backbone.safetensors      # backbone weights -- absent when the backbone is an official
                              #   B-cos-v2 checkpoint (referenced by name, hash-checked on load)
    saes/<layer>/config.json  # one topk-sae model per decomposed layer
    saes/<layer>/model.safetensors

Loading is strict and never unpickles: ``config.json`` is validated field by field, the backbone
is rebuilt from its registry name and loaded with exact keys and shapes (its file hash is
checked against the config), and each SAE goes through ``topk_sae``'s strict loader. Remote
repositories are fetched with :func:`huggingface_hub.snapshot_download` and its standard
arguments (``revision``, ``cache_dir``, ``force_download``, ``local_files_only``, ``token``,
``subfolder``), so the usual Hub cache, offline mode and repo ids with dots all work.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fact_model._atomic import atomic_path, atomic_write_json, atomic_write_text
from fact_model.model import BackboneSpec
from topk_sae import BiasFreeTopKSAE

if TYPE_CHECKING:
    from fact_model.model import FaCT

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "from_pretrained", "push_to_hub", "save_pretrained"]

CONFIG_NAME = "config.json"
BACKBONE_NAME = "backbone.safetensors"
CARD_NAME = "README.md"
SAE_DIR = "saes"
MODEL_TYPE = "fact"
FORMAT_VERSION = 1
_CONFIG_KEYS = {
    "model_type",
    "format_version",
    "backbone",
    "backbone_sha256",
    "layers",
    "input_size",
    "transform",
    "class_names",
    "metadata",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _transform_config(model: FaCT) -> dict[str, int | None]:
    cfg = model.pretrained_cfg
    resize = getattr(cfg, "resize_size", None)
    crop = getattr(cfg, "crop_size", None)
    return {"resize": int(resize) if resize else None, "crop": int(crop) if crop else None}


def model_card(model: FaCT, config: Mapping[str, Any]) -> str:
    """A Hub model card: YAML front matter, what the model is, its layers and metrics."""
    meta = dict(config.get("metadata") or {})
    evaluation = meta.get("evaluation", {}) if isinstance(meta.get("evaluation"), dict) else {}
    spec = config["backbone"]
    rows = []
    for name in model.layers:
        info = model.layer_info(name)
        acc = evaluation.get(name, {}) if isinstance(evaluation.get(name), dict) else {}
        top1 = acc.get("top1")
        rows.append(
            f"| `{name}` | {info.n_latents} | {info.k} | {info.d_in} | "
            + (f"{100 * float(top1):.2f}" if top1 is not None else "–")
            + " |"
        )
    bcos_top1 = (
        evaluation.get("bcos", {}).get("top1") if isinstance(evaluation.get("bcos"), dict) else None
    )
    weights = (
        "official B-cos-v2 checkpoint" if spec["official"] else "stored in `backbone.safetensors`"
    )
    data = meta.get("training_data", "not recorded")
    return (
        "---\nlibrary_name: fact-model\ntags:\n- fact\n- b-cos\n- sparse-autoencoder\n"
        "- interpretability\n- concept-explanations\n---\n\n"
        f"# FaCT model: B-cos `{spec['name']}` with {len(model.layers)} concept layer(s)\n\n"
        "A B-cos network with bias-free TopK sparse autoencoders inside it (FaCT, Parchami-Araghi "
        "et al., NeurIPS 2025). Every logit is exactly a sum of concept contributions (Eq. 9) "
        "and every concept activation exactly a sum of pixel attributions (Eq. 12).\n\n"
        f"- Backbone: `{spec['name']}` {json.dumps(spec['kwargs']) if spec['kwargs'] else ''} "
        f"({weights})\n"
        f"- Training data: {data}\n"
        + (
            f"- B-cos backbone top-1: {100 * float(bcos_top1):.2f}%\n"
            if bcos_top1 is not None
            else ""
        )
        + "\n| layer | concepts | k | channels | FaCT top-1 (%) |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n```python\nfrom fact_model import FaCT\n"
        "model = FaCT.from_pretrained('<this repo or directory>')\n"
        "explanation = model.explain(model.transform(image)[None])  # Eq. 9, with its error\n```\n"
        + (
            f"\n## Metadata\n\n```json\n{json.dumps(meta, indent=2, sort_keys=True, default=str)}\n```\n"
            if meta
            else ""
        )
    )


def save_pretrained(
    model: FaCT,
    save_directory: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    include_backbone: bool | None = None,
) -> Path:
    """Write ``model`` to ``save_directory`` (created if needed); returns the directory.

    ``include_backbone``: store the backbone weights (default: unless the backbone is an
    official B-cos-v2 checkpoint, which is referenced by name). ``metadata`` (JSON) goes into
    ``config.json`` and the model card, e.g. ``{"evaluation": {"layer4": {"top1": 0.77}},
    "training_data": "ImageNet-1k train"}``. Each file is written atomically and
    ``config.json`` last, so a directory with a config is complete.
    """
    spec = model.spec
    if spec is None:
        raise ValueError(
            "cannot save: the backbone's registry name is unknown. Build it with "
            "bcos_layers.create(...) or pass FaCT(..., spec=BackboneSpec(name, kwargs))"
        )
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    store_weights = (not spec.official) if include_backbone is None else bool(include_backbone)
    backbone = model.backbone_module()
    if store_weights:
        with atomic_path(out / BACKBONE_NAME) as tmp:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()},
                str(tmp),
            )
        backbone_sha = _sha256(out / BACKBONE_NAME)
    else:
        (out / BACKBONE_NAME).unlink(missing_ok=True)
        backbone_sha = None
    layers = []
    for name in model.layers:
        sub = f"{SAE_DIR}/{name}"
        model.sae(name).save_pretrained(out / sub)
        layers.append({"name": name, "subfolder": sub})
    spec_dict = BackboneSpec(
        spec.name, spec.kwargs, official=spec.official and not store_weights
    ).to_dict()
    config: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "format_version": FORMAT_VERSION,
        "backbone": spec_dict,
        "backbone_sha256": backbone_sha,
        "layers": layers,
        "input_size": model.input_size,
        "transform": _transform_config(model),
        "class_names": model.class_names,
        "metadata": json.loads(json.dumps(dict(metadata or {}), default=str)),
    }
    atomic_write_text(out / CARD_NAME, model_card(model, config))
    atomic_write_json(out / CONFIG_NAME, config)
    return out


# ----------------------------------------------------------------------------- loading
def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def resolve_directory(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str | None = None,
) -> Path:
    """A local directory holding the model: ``name_or_path`` itself, or a Hub snapshot."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = local / subfolder if subfolder else local
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist (subfolder {subfolder!r} of {local})")
        return path
    name = str(name_or_path)
    if local.exists():
        raise NotADirectoryError(
            f"{local} is a file; a FaCT model is a directory with {CONFIG_NAME}"
        )
    if not _looks_like_repo_id(name):
        raise FileNotFoundError(
            f"{name!r} is not an existing directory, nor a Hub repository id ('owner/name')"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snap = snapshot_download(
            repo_id=name,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=[f"{subfolder}/*"] if subfolder else None,
            library_name="fact-model",
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{name!r} is not a local directory, and the Hub repository is not in the cache "
            f"({'offline mode' if local_files_only or os.environ.get('HF_HUB_OFFLINE') else 'download failed'}): {err}"
        ) from err
    path = Path(snap) / subfolder if subfolder else Path(snap)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"the Hub repository {name!r} has no {subfolder + '/' if subfolder else ''}{CONFIG_NAME}"
        )
    return path


def _fail(path: Path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a FaCT directory, validated field by field."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: not a directory written by FaCT.save_pretrained"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"not valid JSON ({err}); the file is corrupt or truncated") from err
    if not isinstance(config, dict):
        raise _fail(path, "must hold a JSON object")
    if config.get("model_type") != MODEL_TYPE:
        raise _fail(path, f"model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise _fail(
            path,
            f"format_version {config.get('format_version')!r}; this fact-model reads {FORMAT_VERSION}",
        )
    unknown = sorted(set(config) - _CONFIG_KEYS)
    missing = sorted({"backbone", "layers", "input_size"} - set(config))
    if unknown or missing:
        raise _fail(path, f"unknown keys {unknown}, missing keys {missing}")
    try:
        config["backbone"] = BackboneSpec.from_dict(config["backbone"])
    except (ValueError, TypeError, AttributeError) as err:
        raise _fail(path, f"backbone: {err}") from err
    size = config["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise _fail(path, f"input_size must be a positive integer, got {size!r}")
    layers = config["layers"]
    if not isinstance(layers, list) or not layers:
        raise _fail(path, "layers must be a non-empty list")
    for entry in layers:
        if not (
            isinstance(entry, dict)
            and set(entry) == {"name", "subfolder"}
            and all(isinstance(entry[k], str) and entry[k] for k in entry)
        ):
            raise _fail(
                path, f"each layer must be {{'name': str, 'subfolder': str}}, got {entry!r}"
            )
        sub = Path(entry["subfolder"])
        if sub.is_absolute() or ".." in sub.parts:
            raise _fail(
                path, f"layer subfolder {entry['subfolder']!r} must stay inside the model directory"
            )
    transform = config.get("transform") or {"resize": None, "crop": None}
    if not (
        isinstance(transform, dict)
        and set(transform) <= {"resize", "crop"}
        and all(
            v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0)
            for v in transform.values()
        )
    ):
        raise _fail(
            path, f"transform must be {{'resize': int|null, 'crop': int|null}}, got {transform!r}"
        )
    config["transform"] = {"resize": transform.get("resize"), "crop": transform.get("crop")}
    names = config.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        raise _fail(path, "class_names must be a list of strings or null")
    sha = config.get("backbone_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise _fail(path, f"backbone_sha256 must be a 64-digit hex string or null, got {sha!r}")
    if not isinstance(config.get("metadata", {}), dict):
        raise _fail(path, "metadata must be an object")
    return config


def _load_backbone(directory: Path, config: dict[str, Any], map_location: Any) -> torch.nn.Module:
    from bcos_layers.models.registry import PretrainedCfg, load_state_dict_strict

    spec: BackboneSpec = config["backbone"]
    weights = directory / BACKBONE_NAME
    if spec.official:
        backbone = spec.build(pretrained=True)
    else:
        if not weights.is_file():
            raise FileNotFoundError(
                f"{weights} is missing: the config says the backbone weights are stored with the "
                "model (backbone.official is false)"
            )
        expected = config.get("backbone_sha256")
        if expected is not None and _sha256(weights) != expected:
            raise ValueError(
                f"{weights} does not match the SHA-256 in {CONFIG_NAME} (corrupt or replaced "
                "file); download the model again"
            )
        backbone = spec.build(pretrained=False)
        try:
            with safe_open(str(weights), framework="pt", device="cpu") as fh:
                state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
        load_state_dict_strict(backbone, state, source=str(weights))
    tf = config["transform"]
    old = getattr(backbone, "pretrained_cfg", None)
    backbone.pretrained_cfg = PretrainedCfg(
        name=spec.name,
        resize_size=tf["resize"] or getattr(old, "resize_size", config["input_size"]),
        crop_size=tf["crop"] or config["input_size"],
        source="official" if spec.official else str(weights),
    )
    return backbone.to(map_location).eval()


def from_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    cls: type[FaCT] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str | None = None,
    map_location: str | torch.device = "cpu",
) -> FaCT:
    """Load a FaCT model from a directory or a Hub repo id (strict; never unpickles)."""
    from fact_model.model import FaCT as _FaCT

    cls = cls or _FaCT
    directory = resolve_directory(
        name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        token=token,
        subfolder=subfolder,
    )
    config = read_config(directory)
    backbone = _load_backbone(directory, config, map_location)
    saes = {}
    for entry in config["layers"]:
        sae_dir = directory / entry["subfolder"]
        if not sae_dir.is_dir():
            raise FileNotFoundError(f"{sae_dir} is missing: the SAE of layer {entry['name']!r}")
        saes[entry["name"]] = BiasFreeTopKSAE.from_pretrained(sae_dir).to(map_location)
    return cls(
        backbone,
        saes,
        copy=False,
        input_size=config["input_size"],
        spec=config["backbone"],
        class_names=config.get("class_names"),
    )


def push_to_hub(
    model: FaCT,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload FaCT model",
    metadata: Mapping[str, Any] | None = None,
    include_backbone: bool | None = None,
    api: Any = None,
) -> Any:
    """Create the model repository if needed and upload the model; returns the ``CommitInfo``."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, metadata=metadata, include_backbone=include_backbone)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            repo_type="model",
            revision=branch,
            create_pr=create_pr,
            commit_message=commit_message,
        )
