"""Feature-extraction throughput (images/s) of ``fact_model.extract_features``, end to end.

Run from the repository root:

    uv run python benchmarks/extraction_speed.py [--device cpu|cuda] [--images 64] [--bf16]

B-cos ResNet-50 (random weights: the speed does not depend on them), ``layer4``, 224 x 224
inputs from generated 256 x 256 JPEG files decoded and transformed by the model's own eval
transform, M = 16 positions per image (the paper's ResNet-50 ``layer4`` setting), held-out
images off. Per image this is one forward and one backward pass in explanation mode (the
Eq. A.1 contributions), the Gumbel-top-k draw and the store write. The figure is the median
of ``--repeats`` extractions into fresh directories, after one warm-up extraction; also printed:
the forward + backward alone on one batch (the compute floor) and the share of the end-to-end
time it accounts for.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import bcos_layers
    from fact_model.data import IndexedImages, eval_transform_for, open_dataset
    from fact_model.features import FeatureConfig, _Tap, extract_features, position_weights

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = bcos_layers.create("resnet50").eval()
    tmp = Path(tempfile.mkdtemp(prefix="fact-extract-bench-"))
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp / "img" / f"c{c}").mkdir(parents=True)
        for i in range(args.images // 2):
            arr = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp / "img" / f"c{c}" / f"{i}.jpg", quality=90)
    data = IndexedImages(open_dataset(f"imagefolder:{tmp / 'img'}"), eval_transform_for(backbone))
    cfg = FeatureConfig(
        layer="layer4", samples_per_image=16, heldout_per_class=0, batch_size=args.batch,
        autocast_bf16=args.bf16,
    )  # fmt: skip

    def extract(run: int) -> float:
        _sync(device)
        t = time.perf_counter()
        extract_features(backbone, data, tmp / f"run{run}", cfg, device=device, progress=False)
        _sync(device)
        return time.perf_counter() - t

    extract(-1)  # warm-up
    times = [extract(r) for r in range(args.repeats)]
    tap = _Tap(backbone, "layer4")
    tap.model.to(device)
    x = torch.stack([data[i][0] for i in range(args.batch)]).to(device)
    position_weights(tap, x, "layer4", autocast_bf16=args.bf16)
    floor = []
    for _ in range(max(3, args.repeats)):
        _sync(device)
        t = time.perf_counter()
        position_weights(tap, x, "layer4", autocast_bf16=args.bf16)
        _sync(device)
        floor.append(time.perf_counter() - t)
    med = statistics.median(times)
    per_img_floor = statistics.median(floor) / args.batch
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    print(
        f"machine: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}, bf16 {args.bf16}"
    )
    print(
        f"ResNet-50 layer4, 224x224, M=16, batch {args.batch}, {args.images} images, median of "
        f"{args.repeats}"
    )
    print(f"end to end: {args.images / med:8.2f} images/s ({med:.2f} s)")
    print(
        f"forward+backward alone: {1 / per_img_floor:8.2f} images/s "
        f"({100 * per_img_floor * args.images / med:.0f} % of the end-to-end time)"
    )


if __name__ == "__main__":
    main()
