"""The released B-cos-v2 ImageNet checkpoints: download, verify, load safely, convert.

The official weights are plain ``torch.save``'d state dicts named ``<stem>-<sha256[:10]>.pth``
(B-cos-v2 ``scripts/strip_checkpoints.py``). This module

* downloads them from the B-cos-v2 release into the torch hub cache
  (``torch.hub.get_dir()/checkpoints``, which honours ``TORCH_HOME``) with a progress bar,
  atomically (:mod:`bcos_layers.fileio`: temporary file, fsync, rename, directory fsync);
* verifies the SHA-256 prefix carried by the file name, on every load (a corrupted cache file
  is caught, not silently used);
* loads with ``torch.load(weights_only=True, map_location="cpu")`` -- never a full unpickle --
  and checks that the result is a flat ``dict[str, Tensor]``;
* converts a checkpoint to ``safetensors`` plus a ``config.json`` naming the architecture, and
  loads such a directory back (:func:`load_safetensors_checkpoint`).

The strict key check against a model is done by ``bcos_layers.models.create(...,
pretrained=...)``, which calls :func:`load_official_state_dict`.

Command line: ``bcos-checkpoints {list,download,convert} ...`` (also
``python -m bcos_layers.pretrained ...``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import urllib.error
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bcos_layers.fileio import atomic_path, write_bytes_atomic

__all__ = [
    "NOT_PORTED",
    "OFFICIAL_CHECKPOINTS",
    "RELEASE_URL",
    "CheckpointError",
    "CheckpointHashError",
    "OfficialCheckpoint",
    "SafetensorsCheckpoint",
    "checkpoint_dir",
    "convert_to_safetensors",
    "download_official",
    "load_official_state_dict",
    "load_safetensors_checkpoint",
    "load_state_dict_file",
    "official_checkpoint",
    "sha256_of_file",
]

RELEASE_URL = "https://github.com/B-cos/B-cos-v2/releases/download/v0.0.1-weights/"
"""Base URL of the B-cos-v2 weight release (``models/pretrained.py`` in B-cos-v2)."""

SAFETENSORS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
CONFIG_FORMAT = "bcos-layers/checkpoint"
CONFIG_VERSION = 1

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
"""``<stem>-<hex>.<ext>``: the torch hub convention for a SHA-256 prefix in a file name."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: missing, corrupt, unsafe or of the wrong content."""


class CheckpointHashError(CheckpointError):
    """A checkpoint file's SHA-256 does not start with the expected prefix."""


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One released B-cos-v2 ImageNet checkpoint."""

    name: str
    """Registry name, e.g. ``"resnet50_long"`` (the B-cos-v2 torch hub entrypoint)."""
    arch: str
    """Architecture the weights belong to (``bcos_layers.models.create`` name), e.g.
    ``"resnet50"``; the ``_long`` checkpoints share the architecture of the short ones."""
    url: str
    """Download URL in the B-cos-v2 release."""
    filename: str
    """Release file name, ``<stem>-<sha256_prefix>.pth``; also the name in the local cache."""
    sha256_prefix: str
    """First 10 hex digits of the file's SHA-256 (carried by the file name)."""
    resize_size: int
    """Evaluation ``Resize`` size before ``CenterCrop(224)``: 232 for the ``_long`` CNNs
    (``bcos_final_long``), 256 otherwise."""
    top1: float
    """ImageNet validation top-1 accuracy in percent reported by B-cos-v2 (README)."""


def _official(
    name: str, stem: str, sha: str, resize: int, top1: float, arch: str | None = None
) -> OfficialCheckpoint:
    filename = f"{stem}-{sha}.pth"
    return OfficialCheckpoint(
        name, arch or name, RELEASE_URL + filename, filename, sha, resize, top1
    )


OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    c.name: c
    for c in (
        # (registry name, release file stem, SHA-256 prefix, eval resize, top-1[, arch])
        # bcos_final: 90-epoch ImageNet models
        _official("resnet18", "resnet_18", "68b4160fff", 256, 68.736),
        _official("resnet34", "resnet_34", "a63425a03e", 256, 72.284),
        _official("resnet50", "resnet_50", "ead259efe4", 256, 75.882),
        _official("resnet101", "resnet_101", "84c3658278", 256, 76.532),
        _official("resnet152", "resnet_152", "42051a77c1", 256, 76.484),
        _official("resnext50_32x4d", "resnext_50_32x4d", "57af241ab9", 256, 75.820),
        _official("densenet121", "densenet_121", "b8daf96afb", 256, 73.612),
        _official("densenet161", "densenet_161", "9e9ea51353", 256, 76.622),
        _official("densenet169", "densenet_169", "7037ee0604", 256, 75.186),
        _official("densenet201", "densenet_201", "00ac87066f", 256, 75.480),
        # bcos_final_long: 600-epoch models (architectures of the short ones; eval resize 232)
        _official("resnet50_long", "resnet_50_long", "ef38a88533", 232, 79.468, arch="resnet50"),
        _official("resnet152_long", "resnet_152_long", "0b4b434939", 232, 80.144, arch="resnet152"),
        _official(
            "densenet121_long", "densenet_121_long", "5175461597", 232, 77.302, arch="densenet121"
        ),
        # vit_final: B-cos ViTs (conv-stem ViTc and plain Simple ViT)
        _official("vitc_ti_patch1_14", "bcos_vitc_ti_patch1_14", "ddd6193a77", 256, 67.260),
        _official("vitc_s_patch1_14", "bcos_vitc_s_patch1_14", "cf55c88f0c", 256, 74.504),
        _official("vitc_b_patch1_14", "bcos_vitc_b_patch1_14", "a13c46397b", 256, 77.152),
        _official("vitc_l_patch1_14", "bcos_vitc_l_patch1_14", "8739e18b8d", 256, 77.782),
        _official(
            "simple_vit_ti_patch16_224", "bcos_simple_vit_ti_patch16_224", "4b0824b1c1", 256, 59.960
        ),
        _official(
            "simple_vit_s_patch16_224", "bcos_simple_vit_s_patch16_224", "75e99d1f73", 256, 69.246
        ),
        _official(
            "simple_vit_b_patch16_224", "bcos_simple_vit_b_patch16_224", "1fc4750806", 256, 74.408
        ),
        _official(
            "simple_vit_l_patch16_224", "bcos_simple_vit_l_patch16_224", "9613b2ad0a", 256, 75.060
        ),
    )
}
"""Every B-cos ImageNet checkpoint of the B-cos-v2 release whose architecture this package
builds, by registry name (= the official torch hub entrypoint name)."""

NOT_PORTED: dict[str, str] = {
    "vgg11_bnu": "vgg_11_bnu-34036029f0.pth",
    "convnext_tiny": "convnext_tiny_pn-539b1bfb37.pth",
    "convnext_base": "convnext_base_pn-b0495852c6.pth",
    "convnext_tiny_bnu": "convnext_tiny_bnu-dbd7f5ef9d.pth",
    "convnext_base_bnu": "convnext_base_bnu-7c32a704b3.pth",
}
"""B-cos checkpoints of the release whose architectures (VGG-11, ConvNeXt) bcos-layers does not
implement (official entrypoint name -> release file). The release also holds eight standard,
non-B-cos ViTs (``standard_*``), which are out of scope."""


# --------------------------------------------------------------------------- helpers


def official_checkpoint(name: str) -> OfficialCheckpoint:
    """Look up ``name`` in :data:`OFFICIAL_CHECKPOINTS` with an error listing the valid names."""
    try:
        return OFFICIAL_CHECKPOINTS[name]
    except KeyError:
        if name in NOT_PORTED:
            raise ValueError(
                f"{name!r} ({NOT_PORTED[name]}) is a released B-cos-v2 checkpoint, but "
                "bcos-layers does not implement its architecture (VGG / ConvNeXt); use the "
                "official `bcos` package for it"
            ) from None
        raise ValueError(
            f"unknown official B-cos-v2 checkpoint {name!r}; "
            f"available: {', '.join(sorted(OFFICIAL_CHECKPOINTS))}"
        ) from None


def checkpoint_dir(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache directory: ``model_dir`` if given, else ``torch.hub.get_dir()/checkpoints``."""
    if model_dir is not None:
        return Path(model_dir)
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Full hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _normalize_hash(sha256: str, what: str) -> str:
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", value):
        raise ValueError(
            f"{what} must be 8 to 64 hexadecimal digits of a SHA-256 digest, got {sha256!r}"
        )
    return value


def _verify_hash(path: Path, expected_prefix: str, hint: str = "") -> str:
    """Check that ``path``'s SHA-256 starts with ``expected_prefix``; return the full digest."""
    digest = sha256_of_file(path)
    if not digest.startswith(expected_prefix):
        raise CheckpointHashError(
            f"SHA-256 mismatch for checkpoint file {path}: expected a digest starting with "
            f"{expected_prefix!r}, got {digest!r}. "
            + (hint or "The file is corrupt, truncated or not the expected checkpoint.")
        )
    return digest


def _expected_hash_for_file(path: Path, sha256: str | None) -> str | None:
    if sha256 is not None:
        return _normalize_hash(sha256, "sha256")
    match = _HASH_IN_NAME.search(path.name)
    return match.group(1) if match else None


def _download(url: str, dst: Path, sha256_prefix: str, progress: bool) -> None:
    """Download ``url`` to ``dst`` atomically, verifying the SHA-256 prefix before the rename.

    ``torch.hub.download_url_to_file`` streams into a temporary file next to ``dst`` and hashes
    the stream; only when the hash matches does :func:`~bcos_layers.fileio.atomic_path` fsync
    it and move it into place.
    """
    try:
        with atomic_path(dst) as tmp:
            torch.hub.download_url_to_file(
                url, str(tmp), hash_prefix=sha256_prefix, progress=progress
            )
    except RuntimeError as err:
        if "invalid hash value" in str(err):
            raise CheckpointHashError(
                f"SHA-256 mismatch downloading {url}: {err}. Nothing was written to {dst}."
            ) from err
        raise
    except (urllib.error.URLError, OSError) as err:
        raise CheckpointError(
            f"could not download {url} to {dst}: {err}. Without network access, download the "
            "file elsewhere and pass it with file=<path>."
        ) from err


def download_official(
    name: str,
    *,
    progress: bool = True,
    model_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Return the local path of official checkpoint ``name``, downloading it if needed.

    A cached file is re-verified against the SHA-256 prefix; a cached file that fails the check
    raises :class:`CheckpointHashError` (delete it or pass ``force=True`` to download again).
    """
    ckpt = official_checkpoint(name)
    dst = checkpoint_dir(model_dir) / ckpt.filename
    if dst.exists() and not force:
        _verify_hash(
            dst,
            ckpt.sha256_prefix,
            "The cached file is corrupt or truncated: delete it (or pass force=True) to "
            "download it again.",
        )
        return dst
    _download(ckpt.url, dst, ckpt.sha256_prefix, progress)
    return dst


def _load_tensor_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` a flat ``dict[str, Tensor]`` with clear errors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load checkpoint file {path}: it contains objects other than tensors "
            f"and plain containers, which would need a full (unsafe) unpickle. Details: {err}"
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(
            f"checkpoint file {path} is truncated or corrupt and cannot be read by torch.load: "
            f"{err}"
        ) from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint file {path} holds a {type(obj).__name__}, not a state dict "
            "(a dict of parameter name -> tensor)."
        )
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        raise CheckpointError(
            f"checkpoint file {path} looks like a training checkpoint (it has a 'state_dict' "
            "entry); extract the model's state dict (for PyTorch Lightning: the entries under "
            "'state_dict' with the 'model.' prefix stripped) and save that."
        )
    bad = {k: type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad or bad_keys:
        details = ", ".join(f"{k!r}: {t}" for k, t in list(bad.items())[:5])
        raise CheckpointError(
            f"checkpoint file {path} is not a state dict of tensors: "
            + (f"non-tensor values ({details})" if bad else "")
            + (f"{'; ' if bad else ''}non-string keys {bad_keys[:5]!r}" if bad_keys else "")
        )
    return dict(obj)


def load_state_dict_file(
    file: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    check_hash: bool = True,
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Safely load a local ``torch.save``'d state dict; return it and the file's SHA-256.

    The file's integrity is checked against ``sha256`` if given, else against the hash prefix
    in its file name (``<stem>-<hex>.pth``, as release files are named). A file whose name
    carries no hash needs ``sha256=...`` or an explicit ``check_hash=False`` (then the returned
    digest is ``None``).
    """
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist (or is not a file)")
    digest = None
    if check_hash:
        expected = _expected_hash_for_file(path, sha256)
        if expected is None:
            raise CheckpointError(
                f"cannot verify checkpoint file {path}: its name carries no SHA-256 prefix "
                "(expected '<stem>-<hex>.pth', e.g. 'resnet_50-ead259efe4.pth'). Pass "
                "sha256=<hex digest or prefix>, or check_hash=False if you trust the file."
            )
        hint = (
            ""
            if sha256 is not None
            else f"The expected prefix is the '-{expected}' in the file name (release naming "
            "'<stem>-<sha256[:10]>.pth'); the file is corrupt or truncated, or the name does not "
            "carry a hash (then pass sha256=... or check_hash=False)."
        )
        digest = _verify_hash(path, expected, hint)
    return _load_tensor_dict(path), digest


def load_official_state_dict(
    name: str,
    *,
    file: str | os.PathLike[str] | None = None,
    progress: bool = True,
    sha256: str | None = None,
    check_hash: bool = True,
    model_dir: str | os.PathLike[str] | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of the official B-cos-v2 checkpoint ``name`` (safely loaded, on CPU).

    Args:
        name: a key of :data:`OFFICIAL_CHECKPOINTS` (e.g. ``resnet50``, ``resnet152_long``,
            ``densenet161``, ``vitc_b_patch1_14``; ``bcos-checkpoints list`` shows all).
        file: a local checkpoint to use instead of the download: a directory written by
            :func:`convert_to_safetensors` (or its ``model.safetensors``; its ``config.json``
            must name ``name``'s architecture), or a ``.pth`` file. A ``.pth`` file's integrity
            is checked against ``sha256`` if given, else against the hash prefix in its file
            name (``<stem>-<hex>.pth``, as the release files are named). A file whose name
            carries no hash needs ``sha256=...`` or an explicit ``check_hash=False``. A verified
            file that is not the official ``name`` release file (e.g. fine-tuned weights) loads
            with a warning; the model checks its keys against the architecture.
        progress: show a progress bar while downloading.
        sha256: expected SHA-256 (full digest or a prefix of at least 8 hex digits) of ``file``.
        check_hash: verify the SHA-256 of ``file`` (default). ``False`` only for files you
            trust. Downloads and cached release files are always verified.
        model_dir: download cache; default ``torch.hub.get_dir()/checkpoints``.

    Raises:
        ValueError: unknown ``name`` or malformed ``sha256``.
        FileNotFoundError: ``file`` does not exist.
        CheckpointHashError: the SHA-256 does not match (the error names file and digests).
        CheckpointError: no hash to verify against, truncated/corrupt file, non-tensor objects
            (rejected by ``weights_only``), not a flat ``dict[str, Tensor]``, or a converted
            checkpoint of another architecture.
    """
    ckpt = official_checkpoint(name)
    if file is None:
        if sha256 is not None or not check_hash:
            raise ValueError(
                "sha256= and check_hash= apply to a local file=...; downloads are always verified"
            )
        return _load_tensor_dict(download_official(name, progress=progress, model_dir=model_dir))
    path = Path(file).expanduser()
    if path.is_dir() or path.suffix == ".safetensors":
        if sha256 is not None:
            raise ValueError("sha256= applies to .pth files, not to converted safetensors")
        return load_safetensors_checkpoint(path, arch=ckpt.arch).state_dict
    state, digest = load_state_dict_file(path, sha256=sha256, check_hash=check_hash)
    if digest is not None and not digest.startswith(ckpt.sha256_prefix):
        warnings.warn(
            f"checkpoint file {file} (sha256 {digest[:10]}...) is not the official {name!r} "
            f"release file {ckpt.filename!r}; loading it as {ckpt.arch!r} weights anyway.",
            UserWarning,
            stacklevel=2,
        )
    return state


# --------------------------------------------------------------------------- safetensors


class SafetensorsCheckpoint(NamedTuple):
    """A checkpoint loaded by :func:`load_safetensors_checkpoint`."""

    state_dict: dict[str, torch.Tensor]
    """Parameter name -> tensor (CPU)."""
    arch: str
    """Architecture name for ``bcos_layers.models.create``."""
    config: dict[str, Any]
    """The full ``config.json`` (arch, source, sha256 of the source, eval transform sizes)."""


def convert_to_safetensors(
    name_or_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    arch: str | None = None,
    progress: bool = True,
    sha256: str | None = None,
    check_hash: bool = True,
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; return ``out_dir``.

    ``name_or_file`` is an official checkpoint name (downloaded if needed) or a local ``.pth``
    state-dict file, verified and loaded as by :func:`load_state_dict_file`. For a local file
    ``arch`` is required unless the file name is an official release file name. Both files are
    written atomically (:mod:`bcos_layers.fileio`); the safetensors metadata repeats the arch
    and records the state-dict key order.
    """
    from safetensors.torch import save

    key = os.fspath(name_or_file)
    by_filename = {c.filename: c for c in OFFICIAL_CHECKPOINTS.values()}
    if key in OFFICIAL_CHECKPOINTS:
        ckpt: OfficialCheckpoint | None = OFFICIAL_CHECKPOINTS[key]
        path = download_official(key, progress=progress)
        state, source = _load_tensor_dict(path), ckpt.url
        source_sha: str | None = sha256_of_file(path)
    else:
        path = Path(key).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{key!r} is neither an official checkpoint name "
                f"({', '.join(sorted(OFFICIAL_CHECKPOINTS))}) nor an existing file"
            )
        ckpt = by_filename.get(path.name)
        if ckpt is None and arch is None:
            raise ValueError(
                f"cannot tell the architecture of {path}: pass arch=... (e.g. 'resnet50')"
            )
        state, source_sha = load_state_dict_file(path, sha256=sha256, check_hash=check_hash)
        source = str(path)
    if ckpt is not None and arch is not None and arch != ckpt.arch:
        raise ValueError(f"{key!r} holds {ckpt.arch!r} weights, not arch={arch!r}")
    arch = arch if arch is not None else ckpt.arch  # type: ignore[union-attr]
    config: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_VERSION,
        "arch": arch,
        "checkpoint": ckpt.name if ckpt is not None else None,
        "source": source,
        "source_sha256": source_sha,
        "resize_size": ckpt.resize_size if ckpt is not None else 256,
        "crop_size": 224,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    write_bytes_atomic(
        out / SAFETENSORS_FILENAME,
        save(tensors, metadata={"arch": arch, "key_order": json.dumps(list(tensors))}),
    )
    write_bytes_atomic(out / CONFIG_FILENAME, (json.dumps(config, indent=2) + "\n").encode())
    return out


def load_safetensors_checkpoint(
    path: str | os.PathLike[str], *, arch: str | None = None
) -> SafetensorsCheckpoint:
    """Load a directory written by :func:`convert_to_safetensors` (or its ``.safetensors`` file).

    Strict: ``config.json`` must exist next to the weights, be of this package's format, and
    name the same architecture as the safetensors metadata (and as ``arch`` when given).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    weights = p / SAFETENSORS_FILENAME if p.is_dir() else p
    config_path = weights.parent / CONFIG_FILENAME
    for f in (weights, config_path):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} does not exist; a converted checkpoint is a directory with "
                f"{SAFETENSORS_FILENAME} and {CONFIG_FILENAME} (see convert_to_safetensors)"
            )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise CheckpointError(
            f"{config_path} is not a bcos-layers checkpoint config (expected "
            f"'format': {CONFIG_FORMAT!r})"
        )
    if not isinstance(config.get("arch"), str):
        raise CheckpointError(f"{config_path} names no architecture ('arch')")
    try:
        state = load_file(weights, device="cpu")
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata() or {}
        meta_arch = metadata.get("arch")
        # safetensors stores keys sorted; restore the state-dict order when it was recorded.
        order = json.loads(metadata.get("key_order", "[]"))
        if sorted(order) == sorted(state):
            state = {k: state[k] for k in order}
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{weights} is truncated or not a safetensors file: {err}") from err
    if meta_arch is not None and meta_arch != config["arch"]:
        raise CheckpointError(
            f"{weights} was written for arch {meta_arch!r} but {config_path} says "
            f"{config['arch']!r}"
        )
    if arch is not None and arch != config["arch"]:
        raise CheckpointError(
            f"checkpoint {p} is for architecture {config['arch']!r}, not {arch!r}"
        )
    return SafetensorsCheckpoint(state, config["arch"], config)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``bcos-checkpoints {list,download,convert}`` (console script of bcos-layers)."""
    parser = argparse.ArgumentParser(
        prog="bcos-checkpoints",
        description="Official B-cos-v2 ImageNet checkpoints: list, download, convert.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the official checkpoints")
    p_dl = sub.add_parser("download", help="download and verify checkpoints into the cache")
    p_dl.add_argument("names", nargs="+", choices=sorted(OFFICIAL_CHECKPOINTS))
    p_cv = sub.add_parser("convert", help="convert to safetensors + config.json")
    p_cv.add_argument("source", help="official checkpoint name or local .pth state-dict file")
    p_cv.add_argument("out_dir", help="output directory")
    p_cv.add_argument("--arch", default=None, help="architecture (needed for non-release files)")
    p_cv.add_argument("--sha256", default=None, help="expected SHA-256 of a local file")
    args = parser.parse_args(argv)

    if args.command == "list":
        w = max(map(len, OFFICIAL_CHECKPOINTS))
        for c in OFFICIAL_CHECKPOINTS.values():
            print(
                f"{c.name:{w}} arch={c.arch:{w}} resize={c.resize_size} top1={c.top1:6.3f}  {c.url}"
            )
    elif args.command == "download":
        for name in args.names:
            print(download_official(name))
    else:
        print(convert_to_safetensors(args.source, args.out_dir, arch=args.arch, sha256=args.sha256))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
