"""The ``c2score`` command line: folder of images + activation table + attribution maps -> report.

Example::

    c2score --images val/ --activations acts.safetensors --attributions maps.safetensors \\
        --backbone dinov2-small+loftup --out report.json --work-dir c2run/

Row i of the activation table belongs to the i-th image file of the folder in sorted relative
path order; attribution maps must be aligned with the images *after* ``--resize``/``--crop``
(they are resized bilinearly to that resolution). ``--backbone oracle:FILE.safetensors`` uses
the (N, D, h, w) tensor ``features`` of that file as per-pixel features (validation runs).

Exit status: 0 on success; 2 when the run fails (any error is printed as one line, ``--traceback``
shows the full trace); 3 when the score is undefined (C2 = NaN: no concept could be scored, or
fewer than two usable images) -- the report is still written -- unless ``--allow-nan``.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from c2score.baseline import RandomBaselineConfig
from c2score.evaluate import EvalConfig, evaluate_c2
from c2score.features.oracle import OracleFeatures
from c2score.io import ImageFolder, open_safetensors
from c2score.report import C2Result, UndefinedScoreWarning
from c2score.selection import SelectionConfig

EXIT_ERROR = 2
"""Exit status of a failed run (bad input, missing weights, any other error)."""
EXIT_UNDEFINED = 3
"""Exit status when C2 is NaN (the report is written all the same); ``--allow-nan`` gives 0."""


def _oracle(path: str) -> OracleFeatures:
    with open_safetensors(path, "oracle feature file") as f:
        if "features" not in set(f.keys()):
            raise ValueError(f"{path} has no 'features' tensor (N, D, h, w)")
        feats = f.get_tensor("features")
    if feats.ndim != 4:
        raise ValueError(f"oracle 'features' must be (N, D, h, w), got {tuple(feats.shape)}")
    return OracleFeatures(feats, dim=int(feats.shape[1]))


def _labels(path: str) -> torch.Tensor:
    with open_safetensors(path, "baseline-groups file") as f:
        if "labels" not in set(f.keys()):
            raise ValueError(f"{path} has no 'labels' tensor (one integer label per image)")
        return f.get_tensor("labels")


def _extractor(args: argparse.Namespace) -> object:
    if args.backbone.startswith("oracle:"):
        return _oracle(args.backbone.removeprefix("oracle:"))
    from huggingface_hub.errors import LocalEntryNotFoundError

    from c2score.features import make_extractor  # heavy (transformers): only when needed

    try:
        return make_extractor(
            args.backbone,
            upsampler_weights=args.upsampler_weights,
            local_files_only=args.offline,
            device=args.device,
        )
    except OSError as e:
        # transformers raises a bare OSError for files absent from the cache, huggingface_hub
        # a LocalEntryNotFoundError; a mistyped local path stays a plain "not found"
        if not args.offline or not (isinstance(e, LocalEntryNotFoundError) or type(e) is OSError):
            raise
        weights = f" / {args.upsampler_weights!r}" if args.upsampler_weights else ""
        raise OSError(
            f"--offline: the weights for {args.backbone!r}{weights} are not in the local "
            "Hugging Face cache (HF_HUB_CACHE); run once without --offline to download them, "
            f"or pass local directories / files instead of Hub ids ({' '.join(str(e).split())})"
        ) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="c2score",
        description="C2 concept-consistency score (FaCT paper Eq. 13-16) of a concept method.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", required=True, help="folder of images (sorted relative paths)")
    p.add_argument("--activations", required=True, help="activation table (.safetensors)")
    p.add_argument("--attributions", required=True, help="attribution maps (.safetensors)")
    p.add_argument("--out", default="c2score-report.json", help="JSON report path")
    p.add_argument(
        "--backbone",
        default="dinov2-small+loftup",
        help="feature spec '<backbone>+<upsampler>' (e.g. dinov2-small+bilinear) or oracle:FILE",
    )
    p.add_argument("--upsampler-weights", default=None, help="override the upsampler weights")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device: cpu (default), cuda, cuda:N, mps; nothing runs on a GPU unless asked",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resize", type=int, default=256, help="shorter side; 0 keeps the size")
    p.add_argument("--crop", type=int, default=224, help="centre crop; 0 disables")
    p.add_argument(
        "--preprocessing",
        choices=["float", "pil"],
        default="float",
        help="resize/crop the float image, or (pil) the 8-bit image with torchvision's "
        "Resize/CenterCrop: the authors' pipeline exactly",
    )
    p.add_argument("--work-dir", default=None, help="checkpoints here; rerun to resume")
    p.add_argument("--lowres-cache", default=None, help="cache backbone features here")
    p.add_argument("--checkpoint-every", type=int, default=512, help="images per checkpoint")
    p.add_argument("--top-fraction", type=float, default=0.05)
    p.add_argument("--min-top", type=int, default=10)
    p.add_argument("--min-images", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random baseline")
    p.add_argument(
        "--baseline-weight",
        choices=["mass", "mean", "uniform"],
        default="mass",
        help="random-concept weight: sum of its map (the authors'), its mean, or 1",
    )
    p.add_argument(
        "--resize-then-relu",
        action="store_true",
        help="resize attribution maps before clipping them at 0 (default: clip first, as the "
        "authors)",
    )
    p.add_argument(
        "--baseline-groups",
        default=None,
        help="safetensors with 'labels' (N,) int: per-group (e.g. per-class) random baseline",
    )
    p.add_argument("--histogram", default=None, help="PNG of the score distribution")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--allow-nan",
        action="store_true",
        help=f"exit with 0 when C2 is undefined (NaN) instead of {EXIT_UNDEFINED}",
    )
    p.add_argument("--traceback", action="store_true", help="show the full trace of an error")
    return p


def _describe(error: Exception) -> str:
    """One line for the terminal: the error (its kind too, unless it is a usual input error)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, TypeError, OSError)):  # unexpected: name the kind
        text = f"{type(error).__name__}: {text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # reported below, with the exit status
            warnings.simplefilter("ignore", UndefinedScoreWarning)
            result = _run(args)
        result.save_json(args.out)
        print(result.summary())
        print(f"report: {args.out}")
        if args.histogram and not result.save_histogram(args.histogram):
            print("histogram skipped: matplotlib is not installed", file=sys.stderr)
    except Exception as e:  # a command line prints errors, it does not crash
        if args.traceback:
            raise
        print(f"c2score: error: {_describe(e)}", file=sys.stderr)
        return EXIT_ERROR
    if not math.isfinite(result.c2):
        print(
            f"c2score: {'warning' if args.allow_nan else 'error'}: C2 is undefined (NaN): "
            f"{result.undefined_reason}; the report was written to {args.out}"
            + ("" if args.allow_nan else ". Pass --allow-nan to exit with status 0 in this case"),
            file=sys.stderr,
        )
        return 0 if args.allow_nan else EXIT_UNDEFINED
    return 0


def _run(args: argparse.Namespace) -> C2Result:
    """The evaluation the arguments describe."""
    config = EvalConfig(
        selection=SelectionConfig(args.top_fraction, args.min_top, args.min_images),
        baseline=RandomBaselineConfig(tuple(args.seeds), args.baseline_weight),
        batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        progress=not args.no_progress,
        relu_before_resize=not args.resize_then_relu,
    )
    images = ImageFolder(
        args.images,
        resize=args.resize or None,
        crop=args.crop or None,
        preprocessing=args.preprocessing,
    )
    return evaluate_c2(
        images,
        Path(args.activations),
        Path(args.attributions),
        _extractor(args),  # type: ignore[arg-type]
        config,
        work_dir=args.work_dir,
        lowres_cache=args.lowres_cache,
        baseline_groups=_labels(args.baseline_groups) if args.baseline_groups else None,
    )


if __name__ == "__main__":
    raise SystemExit(main())
