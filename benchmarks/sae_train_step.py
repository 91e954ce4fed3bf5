"""Time one full TopK-SAE training step: ours vs dictionary-learning 0.1.0 and overcomplete 0.3.0.

A step is forward, backward, optimizer update and dictionary renormalisation, on one batch
(d_in=1024, n_latents=16384, k=32, batch 4096, float32; CPU, and CUDA when present). Also timed
in the same run: a plain (4096x1024)@(1024x16384) matmul (the machine's matmul rate), our dense
encoder matmul alone (its share of that rate), and a dense-autograd version of our own bias-free
SAE (to show where the speed-up comes from).

The peers pull in nnsight/transformers/wandb and need matplotlib<3.9 (overcomplete 0.3.0 calls
plt.cm.get_cmap). They are topk-sae's optional ``bench`` dependency group, which the workspace
declares as conflicting with the ``test`` group, so uv resolves it in a fork of its own and it
never constrains the packages or their tests. Run it in an environment of its own::

    UV_PROJECT_ENVIRONMENT=.venv-bench uv run --package topk-sae --group bench \
        python benchmarks/sae_train_step.py

Without the peers installed (``uv run python benchmarks/sae_train_step.py``) only our step,
the dense reference and the matmul rate are timed. Every figure is the median of ``--repeats``
timed steps after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from topk_sae import BiasFreeTopKSAE
from topk_sae.trainer import make_optimizer, training_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(
    d: int, n: int, k: int, x: torch.Tensor, dead_fraction: float, bf16: bool = False
) -> Callable[[], object]:
    model = BiasFreeTopKSAE(d, n, k).to(x.device)
    opt = make_optimizer(model, lr=1e-4)
    dead = torch.zeros(n, dtype=torch.bool, device=x.device)
    dead[: int(dead_fraction * n)] = True

    def step() -> object:
        return training_step(
            model,
            opt,
            x,
            k=k,
            dead_n=dead,
            k_aux=256,
            auxk_coef=1 / 32,
            grad_clip_norm=1.0,
            bf16=bf16,
        )

    return step


def dense_reference(d: int, n: int, k: int, x: torch.Tensor) -> Callable[[], object]:
    """Our bias-free SAE computed densely with plain autograd (scatter + dense decode)."""
    model = BiasFreeTopKSAE(d, n, k).to(x.device)
    opt = make_optimizer(model, lr=1e-4)  # same optimizer as ours: isolates the kernels

    def step() -> object:
        post = F.relu(x @ model.W_enc.T)
        top = post.topk(k, dim=1, sorted=False)
        code = torch.zeros_like(post).scatter(1, top.indices, top.values)
        loss = (code @ model.W_dec - x).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        model.remove_parallel_grad_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.normalize_atoms_()
        return loss

    return step


def dictionary_learning_step(
    d: int, n: int, k: int, x: torch.Tensor, dead_fraction: float
) -> Callable[[], object] | None:
    try:
        from dictionary_learning.trainers.top_k import TopKTrainer
    except ImportError:
        return None
    trainer = TopKTrainer(
        steps=10_000,
        activation_dim=d,
        dict_size=n,
        k=k,
        layer=0,
        lm_name="bench",
        lr=1e-4,
        device=str(x.device),
        seed=0,
    )
    trainer.update(0, x)  # step 0 runs a geometric-median initialisation: keep it untimed
    if dead_fraction > 0:
        trainer.dead_feature_threshold = 1
    state = {"step": 1}

    def step() -> object:
        if dead_fraction > 0:  # keep the requested share of latents dead for AuxK
            trainer.num_tokens_since_fired[: int(dead_fraction * n)] = 10
            trainer.num_tokens_since_fired[int(dead_fraction * n) :] = 0
        state["step"] += 1
        return trainer.update(state["step"], x)

    return step


def overcomplete_step(d: int, n: int, k: int, x: torch.Tensor) -> Callable[[], object] | None:
    """overcomplete's ``train_sae`` loop body (monitoring off) with the plain MSE criterion:
    its cheapest TopK configuration (its AuxK variant runs a top-(n/2) per row)."""
    try:
        from overcomplete.sae import TopKSAE
    except ImportError:
        return None
    model = TopKSAE(d, nb_concepts=n, top_k=k, device=str(x.device))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> object:
        opt.zero_grad()
        _z_pre, _z, x_hat = model(x)
        loss = (x - x_hat).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def run(device: torch.device, args: argparse.Namespace) -> None:
    d, n, k, b = args.d_in, args.n_latents, args.k, args.batch
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=gen).to(device)
    flops = 2.0 * b * d * n
    print(f"\n== {device} | d_in={d} n_latents={n} k={k} batch={b} float32 ==")

    # The plain matmul and our encoder matmul are timed alternately (same load conditions).
    a, w = torch.randn(b, d, device=device), torch.randn(d, n, device=device)
    model = BiasFreeTopKSAE(d, n, k).to(device)
    mm_times, enc_times = [], []
    for _ in range(2 * args.repeats):
        mm_times.append(median_seconds(lambda: a @ w, device, 1 if not mm_times else 0, 1))
        enc_times.append(
            median_seconds(lambda: model.preactivations(x), device, 1 if not enc_times else 0, 1)
        )
    t_mm, t_enc = statistics.median(mm_times), statistics.median(enc_times)
    print(
        f"plain matmul (BxD)@(DxN)        {t_mm * 1e3:9.1f} ms  {flops / t_mm / 1e9:7.1f} GFLOP/s"
    )
    print(
        f"our encoder matmul x @ W_enc^T  {t_enc * 1e3:9.1f} ms  {flops / t_enc / 1e9:7.1f} GFLOP/s"
        f"  = {100 * t_mm / t_enc:5.1f}% of the plain matmul rate"
    )

    results: dict[str, float] = {}
    candidates: list[tuple[str, Callable[[], Callable[[], object] | None]]] = [
        ("topk-sae (ours)", lambda: ours(d, n, k, x, 0.0)),
        ("ours, dense autograd path", lambda: dense_reference(d, n, k, x)),
        ("dictionary-learning 0.1.0", lambda: dictionary_learning_step(d, n, k, x, 0.0)),
        ("overcomplete 0.3.0", lambda: overcomplete_step(d, n, k, x)),
    ]
    if args.bf16:
        candidates.append(("ours, bf16 encoder matmul", lambda: ours(d, n, k, x, 0.0, bf16=True)))
    if args.auxk:
        candidates += [
            ("topk-sae (ours), AuxK on", lambda: ours(d, n, k, x, 0.5)),
            ("dictionary-learning, AuxK on", lambda: dictionary_learning_step(d, n, k, x, 0.5)),
        ]
    for name, make in candidates:
        step = make()
        if step is None:
            print(f"{name:32s}  not installed (see the module docstring)")
            continue
        results[name] = median_seconds(step, device, args.warmup, args.repeats)
        del step
        print(f"{name:32s} {results[name] * 1e3:9.1f} ms/step", flush=True)

    base = results["topk-sae (ours)"]
    print(f"encoder matmul share of our step: {100 * t_enc / base:.1f}%")
    peers = {
        key: v
        for key, v in results.items()
        if key.startswith(("dictionary", "overcomplete")) and "AuxK" not in key
    }
    for name, t in results.items():
        print(f"  {name:32s} {t / base:6.2f}x our step time")
    if peers:
        fastest = min(peers, key=peers.get)
        print(f"speed-up vs the fastest peer ({fastest}): {peers[fastest] / base:.2f}x")
    if "topk-sae (ours), AuxK on" in results and "dictionary-learning, AuxK on" in results:
        ratio = results["dictionary-learning, AuxK on"] / results["topk-sae (ours), AuxK on"]
        print(f"speed-up with AuxK active (50% dead) vs dictionary-learning: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--n-latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--auxk", action="store_true", help="also time steps with 50%% dead latents"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="also time our step with the bf16 encoder matmul"
    )
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    with contextlib.suppress(ImportError):
        import importlib.metadata as md

        for dist in ("dictionary-learning", "overcomplete"):
            with contextlib.suppress(md.PackageNotFoundError):
                print(f"{dist} {md.version(dist)}")
    run(torch.device("cpu"), args)
    if torch.cuda.is_available() and not args.cpu_only:
        print(torch.cuda.get_device_name())
        run(torch.device("cuda"), args)


if __name__ == "__main__":
    main()
