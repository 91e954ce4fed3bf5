"""Is the concept world's class decodable from its ground-truth concepts, and how much of it do
simple pixel statistics already give away?

Linear probes (multinomial logistic regression, L-BFGS, light L2, standardised features) trained
on ``--n-train`` images of the train split and scored on ``--n-test`` images of the test split
of ``ConceptWorld(WorldConfig(...))``, one feature set at a time:

* oracle features from the ground-truth masks (``ConceptWorld.batch``):
  - *concept presence*: which of the 18 concepts occur anywhere (binary); distractors carry
    vocabulary concepts, so presence alone should not determine the class;
  - *concept areas*: the fraction of the image covered by each concept (the 18 masks and the
    "no concept" channel of ``oracle_features``); the main object is the largest one;
  - *pooled concept masks*: the same 19 channels average-pooled to 4 x 4 cells;
* pixel features: the mean colour, a 4 x 4 x 4 colour histogram, and the raw pixels
  average-pooled to 8 x 8 x 3.

The oracle probes bound what a model that finds the concepts can read off linearly; the pixel
probes show how far the task is from trivial. ``--train`` also trains a small B-cos ResNet
(``bcos_layers.create``) on the same images, which takes about 45 s per 1,000 images and epoch
on a 2-core machine (the probes alone take well under 2 minutes).

    uv run python benchmarks/world_learnability.py [--n-train 6000] [--n-test 2000] [--threads 2]
    uv run python benchmarks/world_learnability.py --train --n-train 6000 --epochs 6
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch
from torch import nn

from fact_model.world import ConceptWorld, WorldConfig


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe_accuracy(
    f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, n_classes: int
) -> tuple[float, float]:
    """(train, test) accuracy of a multinomial logistic regression (L-BFGS, light L2)."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    xtr = torch.from_numpy((f_train - mu) / sd).double()
    xte = torch.from_numpy((f_test - mu) / sd).double()
    ytr = torch.from_numpy(y_train)
    torch.manual_seed(0)
    lin = nn.Linear(xtr.shape[1], n_classes).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(xtr), ytr) + 1e-4 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc_tr = float((lin(xtr).argmax(1).numpy() == y_train).mean())
        acc_te = float((lin(xte).argmax(1).numpy() == y_test).mean())
    return acc_tr, acc_te


def _histogram(images: np.ndarray, bins: int = 4) -> np.ndarray:
    q = (images.astype(np.int64) * bins) // 256  # (N, H, W, 3)
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    out = np.stack([np.bincount(c.ravel(), minlength=bins**3) for c in code])
    return out / code[0].size


def _pool(x: np.ndarray, cells: int) -> np.ndarray:
    """Average-pool the last two axes (H, W) to ``cells`` x ``cells`` (H divisible by cells)."""
    *lead, h, w = x.shape
    return x.reshape(*lead, cells, h // cells, cells, w // cells).mean(axis=(-3, -1))


def _features(world: ConceptWorld, split: str, n: int, chunk: int = 500) -> dict[str, np.ndarray]:
    """Every probe's features of images 0 .. n - 1 of ``split``, and the labels."""
    size = world.image_size
    cells = 4 if size % 4 == 0 else 1
    side = 8 if size % 8 == 0 else size
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, n, chunk):
        b = world.batch(range(s, min(n, s + chunk)), split)
        channels = np.concatenate([b.masks, (b.concept_bits == 0)[:, None]], axis=1)  # oracle
        channels = channels.astype(np.float32)
        pixels = b.images.astype(np.float32) / 255.0
        feats = {
            "labels": b.labels,
            "concept presence (18)": b.present.astype(np.float64),
            "concept areas (19)": channels.mean(axis=(2, 3)).astype(np.float64),
            f"concept masks pooled {cells}x{cells} ({19 * cells * cells})": _pool(
                channels, cells
            ).reshape(len(b.labels), -1),
            "mean colour (3)": pixels.reshape(len(b.labels), -1, 3).mean(1),
            "colour histogram 4x4x4 (64)": _histogram(b.images),
            f"pixels pooled {side}x{side}x3 ({side * side * 3})": _pool(
                pixels.transpose(0, 3, 1, 2), side
            ).reshape(len(b.labels), -1),
        }
        for k, v in feats.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {
        k: np.concatenate(v).astype(np.int64 if k == "labels" else np.float64)
        for k, v in parts.items()
    }


def _train_bcos(args: argparse.Namespace, world: ConceptWorld) -> None:
    import bcos_layers
    from bcos_layers.training import UniformOffLabelBCELoss, evaluate, train_one_epoch

    c = world.num_classes
    tr_img, tr_lab = world.images("train", args.n_train)
    te_img, te_lab = world.images("test", args.n_test)
    kw: dict[str, object] = {
        "num_classes": c,
        "inplanes": args.inplanes,
        "small_inputs": args.small_inputs,
    }
    if args.layers:
        from bcos_layers.models.resnet import BasicBlock, BcosResNet

        model = BcosResNet(BasicBlock, [int(v) for v in args.layers.split(",")], **kw)
        desc = f"BcosResNet(BasicBlock, [{args.layers}], {kw})"
    else:
        model = bcos_layers.create(args.arch, **kw)
        desc = f"bcos_layers.create({args.arch!r}, {kw})"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {desc}, {n_params / 1e6:.2f} M parameters")
    add_inverse = bcos_layers.AddInverse()
    gen = torch.Generator().manual_seed(args.seed)

    def batches(images: np.ndarray, labels: np.ndarray, bs: int, shuffle: bool):
        x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
        y_all = torch.from_numpy(labels)

        class _Loader:
            def __len__(self) -> int:
                return math.ceil(len(y_all) / bs)

            def __iter__(self):
                n = len(y_all)
                order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
                for s in range(0, n, bs):
                    idx = order[s : s + bs]
                    x = x_all[idx].float().div_(255.0)
                    if shuffle:  # random horizontal flips
                        flip = torch.rand(len(idx), generator=gen) < 0.5
                        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                    yield add_inverse(x), y_all[idx]

        return _Loader()

    train = batches(tr_img, tr_lab, args.batch_size, True)
    test = batches(te_img, te_lab, 256, False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * len(train), pct_start=args.pct_start
    )
    loss_fn = UniformOffLabelBCELoss()
    t_train = 0.0
    ev = None
    for epoch in range(args.epochs):
        t1 = time.perf_counter()
        st = train_one_epoch(
            model, train, opt, loss_fn=loss_fn, agc_clip_factor=args.agc, scheduler=sched,
            progress=False,
        )  # fmt: skip
        t_train += time.perf_counter() - t1
        ev = evaluate(model, test, loss_fn=loss_fn, progress=False)
        print(
            f"epoch {epoch + 1}: train loss {st.loss:.4f} acc {st.accuracy:.3f} | test acc "
            f"{ev.accuracy:.4f} | training so far {t_train:.0f} s",
            flush=True,
        )
    if ev is not None:
        print(
            f"B-cos test accuracy {ev.accuracy:.4f} after {args.epochs} epochs x "
            f"{args.n_train} images ({t_train:.0f} s training)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--world", default="", help="WorldConfig overrides, e.g. noise=8,clutter=4")
    ap.add_argument("--train", action="store_true", help="also train a B-cos ResNet (slow)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--inplanes", type=int, default=16)
    ap.add_argument("--layers", default=None, help="BasicBlock counts, e.g. 1,1,1,1")
    ap.add_argument("--small-inputs", action="store_true")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pct-start", type=float, default=0.15)
    ap.add_argument("--agc", type=float, default=None, help="AGC clip factor (default: off)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    overrides: dict[str, object] = {"seed": args.seed}
    for item in filter(None, args.world.split(",")):
        k, v = item.split("=")
        overrides[k] = float(v) if "." in v else int(v)
    world = ConceptWorld(WorldConfig(**overrides))
    c = world.num_classes
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start; torch {torch.__version__}, {args.threads} threads"
    )
    print(f"world: {world.config}")

    t0 = time.perf_counter()
    train = _features(world, "train", args.n_train)
    test = _features(world, "test", args.n_test)
    print(
        f"features of {args.n_train} train + {args.n_test} test images: {time.perf_counter() - t0:.1f} s"
    )
    print(f"linear probe accuracy ({c} classes, chance {1 / c:.3f}):")
    print(f"  {'features':38s} {'train':>6s} {'test':>6s} {'time':>6s}")
    for name in train:
        if name == "labels":
            continue
        t1 = time.perf_counter()
        acc_tr, acc_te = _probe_accuracy(
            train[name], train["labels"], test[name], test["labels"], c
        )
        print(
            f"  {name:38s} {acc_tr:6.3f} {acc_te:6.3f} {time.perf_counter() - t1:5.1f}s", flush=True
        )
    if args.train:
        _train_bcos(args, world)
    print(f"total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
