"""Forward and explanation-pass speed: our B-cos ResNet-50 / DenseNet-121 vs bcos 0.1.3 vs torchvision.

Run from the repository root (bcos and torchvision come with the bcos-layers test group):

    uv run --package bcos-layers --group test python benchmarks/bcos_forward.py

Options: ``--repeats N`` (timed runs per case, default 5 on CPU / 20 on GPU), ``--warmup N``,
``--batch 8``, ``--size 224``, ``--models resnet50 densenet121``, ``--device cpu|cuda|all``,
``--threads N`` (CPU threads; use ``--threads 1`` on a machine shared with other jobs, where
OpenMP threads waiting on each other make 2-thread timings swing by 3x), ``--profile`` (top
ops of ours and bcos per case), ``--json FILE``.

Every case builds our model with random weights and loads the same state dict strictly into
the official ``bcos`` model (after checking that both give the same logits); torchvision's
plain ``resnet50``/``densenet121`` (3 input channels, ReLU, biased BN) is the non-B-cos peer.

* forward: ``model(x)`` under ``torch.no_grad()``.
* input check: our model-entry check alone (``_check_input``: shape, dtype, per-element
  NaN/Inf), reported with the forward pass as a share of our forward time.
* explanation: the B-cos explanation pass, ``x.requires_grad_()``, explanation mode on,
  ``model(x).max(1).values.sum().backward(inputs=[x])`` -> W(x) for the predicted class of
  every sample. torchvision: the same gradient pass (no explanation mode exists).

Runs are interleaved (ours, bcos, torchvision, ours, ...) so that machine noise hits all three
alike; each figure is the median over the timed repeats after warm-up, of the wall-clock time
and (CPU only) of the process CPU time, which counts the work done rather than the time spent
waiting for a core and so is the steadier figure on a shared machine. Default runtime on an
otherwise idle 2-core CPU: about 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

IMPLS = ("ours", "bcos", "torchvision")


def _bcos_layers_models(arch: str) -> nn.Module:
    from bcos_layers.models import create

    return create(arch)


def _official(arch: str) -> nn.Module:
    import bcos.models.pretrained as official

    return getattr(official, arch)(pretrained=False)


def _torchvision(arch: str) -> nn.Module:
    import torchvision.models as tvm

    return getattr(tvm, arch)(weights=None)


@torch.no_grad()
def _calibrate_running_var(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BN's running variance from one batch so that random-weight activations
    stay O(1) through the depth (otherwise logits overflow or vanish)."""
    was_training = model.training
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    model(x)
    model.train(was_training)


def build_models(
    arch: str, device: torch.device, x6: torch.Tensor
) -> tuple[dict[str, nn.Module], float]:
    """Our model (random, calibrated), the official one with the same weights, torchvision."""
    torch.manual_seed(0)
    ours = _bcos_layers_models(arch)
    _calibrate_running_var(ours, x6[:4].cpu())
    theirs = _official(arch)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    tv = _torchvision(arch)
    models = {"ours": ours, "bcos": theirs, "torchvision": tv}
    for m in models.values():
        m.eval().to(device)
    with torch.no_grad():
        a, b = ours(x6[:2]), theirs(x6[:2])
    diff = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return models, diff


def _explain_ctx(impl: str, model: nn.Module) -> AbstractContextManager[object]:
    if impl == "ours":
        from bcos_layers import explanation_mode

        return explanation_mode(model)
    if impl == "bcos":
        return model.explanation_mode()  # type: ignore[operator]
    return nullcontext()


def make_runner(
    impl: str, model: nn.Module, x: torch.Tensor, kind: str
) -> Callable[[], torch.Tensor]:
    if kind == "forward":

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return model(x)

        return forward

    def explain() -> torch.Tensor:
        xg = x.detach().clone().requires_grad_()
        with torch.enable_grad(), _explain_ctx(impl, model):
            out = model(xg)
            out.max(1).values.sum().backward(inputs=[xg])
        assert xg.grad is not None
        return xg.grad

    return explain


def _input_check_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Our model's entry check exactly as its forward calls it (``BcosModelMixin._check_input``
    -> ``check_image_batch``: shape, dtype, per-element NaN/Inf)."""

    def check() -> torch.Tensor:
        model._check_input(x)  # type: ignore[operator]
        return x

    return check


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runners: dict[str, Callable[[], torch.Tensor]],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call, wall clock and process CPU time; implementations alternate, the order
    rotating every round."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    _sync(device)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            runners[name]()
            _sync(device)
            times[name]["wall"].append(time.perf_counter() - w0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def profile_top_ops(fn: Callable[[], torch.Tensor], device: torch.device, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = (
        f"torch {torch.__version__}, {cpu}, {torch.get_num_threads()} CPU threads, "
        f"python {platform.python_version()}"
    )
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--passes", nargs="+", default=["forward", "explanation"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")]
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda":
        if len(devices) == 1:
            parser.error("--device cuda but torch.cuda.is_available() is False")
        devices = devices[1:]

    results: list[dict[str, object]] = []
    for device in devices:
        repeats = args.repeats or (5 if device.type == "cpu" else 20)
        warmup = args.warmup if device.type == "cpu" else max(args.warmup, 3)
        print(f"\n== {device.type}: {machine_description(device)}")
        print(
            f"   batch {args.batch}, {args.size}x{args.size}, median of {repeats} after {warmup} warm-up"
        )
        g = torch.Generator().manual_seed(0)
        rgb = torch.rand(args.batch, 3, args.size, args.size, generator=g)
        x6 = torch.cat([rgb, 1 - rgb], 1)
        for arch in args.models:
            models, diff = build_models(arch, device, x6)
            inputs = {"ours": x6.to(device), "bcos": x6.to(device), "torchvision": rgb.to(device)}
            print(f"   {arch}: ours vs bcos logits max rel diff {diff:.1e}", flush=True)
            for kind in args.passes:
                runners = {i: make_runner(i, models[i], inputs[i], kind) for i in IMPLS}
                times = time_interleaved(runners, device, repeats, warmup)
                med = {i: statistics.median(t["wall"]) for i, t in times.items()}
                cpu = {i: statistics.median(t["cpu"]) for i, t in times.items()}
                row = {
                    "device": device.type,
                    "model": arch,
                    "pass": kind,
                    **{f"{i}_ms": 1e3 * med[i] for i in IMPLS},
                    "ours/bcos": med["ours"] / med["bcos"],
                    "ours/torchvision": med["ours"] / med["torchvision"],
                    # Process CPU time (all threads): on a shared CPU it counts the work done,
                    # not the time spent waiting for a core. Meaningless for GPU runs.
                    **{f"{i}_cpu_ms": 1e3 * cpu[i] for i in IMPLS},
                    "ours/bcos cpu": cpu["ours"] / cpu["bcos"],
                    "ours/torchvision cpu": cpu["ours"] / cpu["torchvision"],
                    "repeats": repeats,
                }
                if kind == "forward":
                    # the model-entry input check (shape, dtype, per-element NaN/Inf) alone
                    check = _input_check_runner(models["ours"], inputs["ours"])
                    check_s = statistics.median(
                        time_interleaved({"check": check}, device, repeats, warmup)["check"]["wall"]
                    )
                    row["ours_input_check_ms"] = 1e3 * check_s
                    row["input_check/ours forward"] = check_s / med["ours"]
                results.append(row)
                print(
                    f"   {arch:12} {kind:11} "
                    + "  ".join(f"{i} {1e3 * med[i]:8.1f} ms" for i in IMPLS)
                    + f"  ours/bcos {row['ours/bcos']:.3f}",
                    flush=True,
                )
                if kind == "forward":
                    print(
                        f"   {arch:12} input check {row['ours_input_check_ms']:8.2f} ms "
                        f"({100 * row['input_check/ours forward']:.2f} % of our forward)",
                        flush=True,
                    )
                if args.profile:
                    for impl in ("ours", "bcos"):
                        print(f"\n-- profile {impl} {arch} {kind} on {device.type}")
                        print(profile_top_ops(runners[impl], device))
            del models
    _print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(devices[0]), "results": results}, f, indent=2)
    return results


def _print_table(results: list[dict[str, object]]) -> None:
    header = (
        f"\n{'device':6} {'model':12} {'pass':11} {'ours ms':>9} {'bcos ms':>9} {'tv ms':>9} "
        f"{'ours/bcos':>9} {'ours/tv':>8} | CPU time: {'ours/bcos':>9} {'ours/tv':>8}"
    )
    print(header)
    print("-" * (len(header) - 1))
    for r in results:
        print(
            f"{r['device']:6} {r['model']:12} {r['pass']:11} {r['ours_ms']:9.1f} "
            f"{r['bcos_ms']:9.1f} {r['torchvision_ms']:9.1f} {r['ours/bcos']:9.3f} "
            f"{r['ours/torchvision']:8.3f} | {'':9} {r['ours/bcos cpu']:9.3f} "
            f"{r['ours/torchvision cpu']:8.3f}"
        )


if __name__ == "__main__":
    main()
