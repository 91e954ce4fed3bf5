"""Train the standard torchvision network the CRP baseline runs on, for the concept world.

CRP (Achtibat et al.) explains an ordinary network, not a B-cos one, so the paper's comparison
needs a standard network trained on the same data. This script trains torchvision's ResNet-18
(12 classes, random init) on the concept world's training images with the same preprocessing
``fact compare`` gives CRP (the RGB half of the FaCT model's input, ImageNet-normalised) and
writes its state dict as safetensors. Then:

    uv run python benchmarks/crp_world_network.py --model fact-demo-output/model \
        --out crp-resnet18.safetensors
    uv run fact compare c2 fact-demo-output/model --out tables/ --layer layer4 \
        --crp-model resnet18 --crp-weights crp-resnet18.safetensors --crp-layer layer4

Deterministic for a seed (CPU). Prints the held-out accuracy on the world's test split.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the FaCT model (its input transform is used)")
    p.add_argument("--out", required=True, help="safetensors file for the trained state dict")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from fact_model import FaCT
    from fact_model.cli import _CrpInput
    from fact_model.data import IndexedImages, eval_transform_for
    from fact_model.world_source import WorldImages

    fact = FaCT.from_pretrained(args.model)
    transform = _CrpInput(eval_transform_for(fact))
    train = IndexedImages(WorldImages(split="train", n=args.n_train), transform)
    test = IndexedImages(WorldImages(split="test"), transform)
    torch.manual_seed(args.seed)
    net = torchvision.models.get_model(args.arch, num_classes=fact.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)

    def loader(ds: IndexedImages, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(args.seed)
        return DataLoader(
            ds, batch_size=args.batch_size, shuffle=shuffle, generator=gen,
            collate_fn=lambda items: (torch.stack([x for x, _, _ in items]),
                                      torch.tensor([y for _, y, _ in items])),
        )  # fmt: skip

    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=f"train {args.arch}", unit="step")
    for _ in range(args.epochs):
        net.train()
        for x, y in loader(train, True):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    net.eval()
    hits = n = 0
    with torch.no_grad():
        for x, y in loader(test, False):
            hits += int((net(x).argmax(1) == y).sum())
            n += len(y)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out)
    print(
        f"{args.arch}: test accuracy {100 * hits / n:.1f}% on {n} world test images, "
        f"trained in {time.perf_counter() - t0:.0f} s; weights: {args.out}"
    )


if __name__ == "__main__":
    main()
