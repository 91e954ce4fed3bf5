"""On-disk sharded feature store: round trips, exact-once shuffled epochs, resume, memory cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

from topk_sae import TrainConfig, train
from topk_sae.data import BatchSource
from topk_sae.store import FeatureStoreWriter, ShardedFeatureStore, StoreSource


def _rows(start: int, n: int, d: int) -> torch.Tensor:
    """Rows whose first column is their global index (exact in float32), the rest random."""
    gen = torch.Generator().manual_seed(start)
    x = torch.randn(n, d, generator=gen)
    x[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    return x


def _write_store(path: Path, n: int, d: int, shard_rows: int, chunk: int = 13) -> torch.Tensor:
    """Write n rows in uneven appends; return the brute-force copy of everything written."""
    with FeatureStoreWriter(path, d, shard_rows=shard_rows, metadata=["image_id"]) as w:
        for start in range(0, n, chunk):
            x = _rows(start, min(chunk, n - start), d)
            w.append(x, image_id=x[:, 0].long() // 3)
    return torch.cat([_rows(s, min(chunk, n - s), d) for s in range(0, n, chunk)])


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


@pytest.fixture(scope="module")
def store_100(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardedFeatureStore, torch.Tensor]:
    path = tmp_path_factory.mktemp("store") / "s"
    full = _write_store(path, 100, 5, shard_rows=16)
    return ShardedFeatureStore(path), full


def test_round_trip_and_range_reads(store_100: tuple[ShardedFeatureStore, torch.Tensor]) -> None:
    store, full = store_100
    assert (store.num_rows, store.d_in, store.dtype) == (100, 5, torch.float32)
    assert [s.num_rows for s in store.shards] == [16] * 6 + [4]
    assert [s.start for s in store.shards] == list(range(0, 100, 16))
    torch.testing.assert_close(store.read(0, 100), full, rtol=0, atol=0)
    for start, stop in [(0, 0), (3, 17), (15, 16), (16, 48), (31, 99), (96, 100)]:
        torch.testing.assert_close(store.read(start, stop), full[start:stop], rtol=0, atol=0)
    assert store.read(10, 40, "image_id").tolist() == [i // 3 for i in range(10, 40)]
    with pytest.raises(IndexError):
        store.read(90, 101)
    with pytest.raises(KeyError, match="unknown field"):
        store.read(0, 3, "position")


@pytest.mark.parametrize(
    ("batch_size", "buffer", "block", "drop_last"),
    [(7, 32, 5, False), (10, 16, None, True), (64, 8, 3, False), (3, 200, 16, False)],
)
def test_epoch_sees_every_row_exactly_once(
    store_100: tuple[ShardedFeatureStore, torch.Tensor],
    batch_size: int,
    buffer: int,
    block: int | None,
    drop_last: bool,
) -> None:
    store, full = store_100
    src = store.source(
        batch_size, seed=3, shuffle_buffer_rows=buffer, block_rows=block, drop_last=drop_last
    )
    assert isinstance(src, BatchSource)
    for epoch in range(2):
        src.set_epoch(epoch)
        batches = list(src)
        assert len(batches) == len(src)
        assert all(b.dtype == torch.float32 and b.shape[1] == 5 for b in batches)
        assert all(b.shape[0] == batch_size for b in batches[:-1])
        seen = torch.cat(batches)
        ids = _ids(seen)
        assert len(set(ids)) == len(ids)  # no row twice
        if drop_last:
            assert len(ids) == 100 // batch_size * batch_size
        else:
            assert sorted(ids) == list(range(100))  # every row once
        # Each row arrives intact (compare with the brute-force copy, not just the id column).
        torch.testing.assert_close(seen, full[torch.tensor(ids)], rtol=0, atol=0)


def test_order_depends_only_on_seed_and_epoch(
    store_100: tuple[ShardedFeatureStore, torch.Tensor],
) -> None:
    store, _ = store_100

    def order(seed: int, epoch: int) -> list[int]:
        src = store.source(8, seed=seed, shuffle_buffer_rows=32, block_rows=4)
        src.set_epoch(epoch)
        return [i for b in src for i in _ids(b)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    # Rows of several shards are mixed inside the first batch, and the order is not sequential.
    first = order(0, 0)[:8]
    assert len({i // 16 for i in first}) >= 2
    assert order(0, 0) != list(range(100))
    # Batches stay valid after later windows reuse the buffer (kept, not consumed at once).
    kept = list(store.source(8, shuffle=False, shuffle_buffer_rows=16, block_rows=4))
    assert [i for b in kept for i in _ids(b)] == list(range(100))


def test_prefetch_gives_the_same_batches(
    store_100: tuple[ShardedFeatureStore, torch.Tensor],
) -> None:
    store, _ = store_100
    for shuffle in (True, False):
        kwargs = {"seed": 2, "shuffle": shuffle, "shuffle_buffer_rows": 20, "block_rows": 6}
        plain = store.source(9, **kwargs)
        ahead = store.source(9, prefetch=True, **kwargs)
        for epoch in (0, 1):
            plain.set_epoch(epoch)
            ahead.set_epoch(epoch)
            expected, got = list(plain), list(ahead)
            assert len(got) == len(expected)
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # Leaving early stops the prefetch thread cleanly; resuming from there still matches.
    ahead.set_epoch(1)
    it = iter(ahead)
    head = [next(it) for _ in range(4)]
    it.close()
    assert all(not t.name.startswith("topk-sae-prefetch") for t in threading.enumerate())
    rest = list(ahead)
    assert all(torch.equal(a, b) for a, b in zip(head + rest, expected))


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 7, 12, 13])
def test_resume_mid_epoch_gives_the_same_batches(
    store_100: tuple[ShardedFeatureStore, torch.Tensor], stop_after: int
) -> None:
    store, _ = store_100
    kwargs = {"seed": 5, "shuffle_buffer_rows": 24, "block_rows": 5}
    reference = store.source(8, **kwargs)
    reference.set_epoch(2)
    expected = list(reference)

    first = store.source(8, **kwargs)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    assert state["epoch"] == 2 and state["position"] == stop_after

    resumed = store.source(8, **kwargs)
    resumed.load_state_dict(state)
    tail = list(resumed)
    got = head + tail
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert list(resumed) == []  # the epoch is exhausted until set_epoch
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(resumed)


def test_resume_refuses_other_settings(store_100: tuple[ShardedFeatureStore, torch.Tensor]) -> None:
    store, _ = store_100
    state = store.source(8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        store.source(8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        store.source(9, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="no batch at all"):
        store.source(101, drop_last=True)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        store.source(0)


def test_writer_resumes_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with (
        pytest.raises(RuntimeError, match="killed"),
        FeatureStoreWriter(path, 4, shard_rows=10) as w,
    ):
        w.append(_rows(0, 25, 4))  # two shards written, five rows pending
        assert (w.num_rows, w.num_pending) == (20, 5)
        raise RuntimeError("killed")
    # Debris of a crash during the next shard write: a temp file and an unrecorded shard.
    (path / "shard-000002.safetensors.tmp").write_bytes(b"partial")
    (path / "shard-000002.safetensors").write_bytes(b"orphan")

    with pytest.raises(ValueError, match="not complete"):
        ShardedFeatureStore(path)
    partial = ShardedFeatureStore(path, allow_incomplete=True)
    assert partial.num_rows == 20

    with pytest.raises(ValueError, match="d_in"):
        FeatureStoreWriter(path, 5, shard_rows=10)
    w = FeatureStoreWriter(path, 4, shard_rows=10)
    assert w.num_rows == 20
    assert not (path / "shard-000002.safetensors.tmp").exists()
    assert not (path / "shard-000002.safetensors").exists()
    w.append(_rows(20, 13, 4))
    w.close()
    store = ShardedFeatureStore(path)
    assert store.complete and store.num_rows == 33
    torch.testing.assert_close(store.read(0, 33), torch.cat([_rows(0, 20, 4), _rows(20, 13, 4)]))


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    w = FeatureStoreWriter(tmp_path / "s", 4, shard_rows=8, metadata=["image_id"])
    ids = torch.arange(3)
    with pytest.raises(ValueError, match=r"\(N, d_in=4\)"):
        w.append(torch.zeros(3, 5), image_id=ids)
    with pytest.raises(ValueError, match=r"\(N, d_in=4\)"):
        w.append(torch.zeros(2, 3, 4), image_id=ids)
    with pytest.raises(TypeError, match="float64"):
        w.append(torch.zeros(3, 4, dtype=torch.float64), image_id=ids)
    with pytest.raises(ValueError, match="metadata fields"):
        w.append(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="integers"):
        w.append(torch.zeros(3, 4), image_id=ids.float())
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        w.append(bad, image_id=ids)
    w.close()
    with pytest.raises(ValueError, match="not empty"):
        FeatureStoreWriter(tmp_path, 4)  # holds the store directory, but no manifest itself

    dropper = FeatureStoreWriter(tmp_path / "d", 4, nonfinite="drop")
    x = _rows(0, 6, 4)
    x[2, 1] = float("inf")
    x[4, 3] = float("nan")
    dropper.append(x.numpy())  # numpy input is accepted as well
    dropper.close()
    store = ShardedFeatureStore(tmp_path / "d")
    assert _ids(store.read(0, store.num_rows)) == [0, 1, 3, 5]
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["num_dropped_nonfinite"] == 2


def test_reader_reports_missing_and_corrupt_stores(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        ShardedFeatureStore(tmp_path)
    path = tmp_path / "s"
    _write_store(path, 30, 3, shard_rows=10)
    manifest = path / "manifest.json"
    good = manifest.read_text()

    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        ShardedFeatureStore(path)

    data = json.loads(good)
    data["num_rows"] = 31
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="31"):
        ShardedFeatureStore(path)

    manifest.write_text(good)
    shard = path / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        ShardedFeatureStore(path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ShardedFeatureStore(path)


def test_half_precision_store_yields_float32(tmp_path: Path) -> None:
    x = _rows(0, 20, 3).to(torch.bfloat16)
    with FeatureStoreWriter(tmp_path / "s", 3, dtype="bfloat16", shard_rows=6) as w:
        w.append(x)
    store = ShardedFeatureStore(tmp_path / "s")
    assert store.dtype == torch.bfloat16
    batch = next(iter(store.source(20, shuffle=False)))
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, x.float(), rtol=0, atol=0)


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from topk_sae.store import ShardedFeatureStore

    def peak_rss() -> int:  # VmHWM: the peak resident set size, in kB
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024

    def reset_peak() -> int:  # Linux >= 4.0: set the peak to the current resident size
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return peak_rss()

    path, batch, buffer, block = sys.argv[1:5]
    torch.zeros(1024).sum()  # let torch finish its lazy start-up before the baseline
    store = ShardedFeatureStore(path)
    src = store.source(int(batch), seed=0, shuffle_buffer_rows=int(buffer), block_rows=int(block))
    base = reset_peak()
    rows, checksum = 0, 0.0
    for b in src:
        rows += b.shape[0]
        checksum += float(b[:, 0].double().sum())
    streamed = peak_rss() - base
    # Calibration: the same probe sees a reader that holds the whole store.
    base = reset_peak()
    everything = store.read(0, store.num_rows)
    loaded = peak_rss() - base
    print(json.dumps({"streamed": streamed, "loaded": loaded, "rows": rows, "sum": checksum}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak RSS from /proc (Linux)")
def test_streaming_an_epoch_stays_under_a_memory_cap(tmp_path: Path) -> None:
    n, d = 49152, 512  # 96 MiB of float32 on disk
    store_bytes = n * d * 4
    # A third of the store. The source needs its 8 MiB shuffle window, a 1 MiB block, two
    # 0.5 MiB batches, plus allocator slack that does not grow with the store (measured ~21 MiB).
    cap = 32 * 2**20
    path = tmp_path / "big"
    with FeatureStoreWriter(path, d, shard_rows=8192) as w:
        for start in range(0, n, 8192):
            w.append(_rows(start, 8192, d))
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path), "256", "4096", "512"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["rows"] == n
    assert probe["sum"] == n * (n - 1) / 2  # the row ids 0..n-1, each once (exact in float64)
    assert probe["streamed"] < cap, f"streaming peaked at {probe['streamed'] / 2**20:.1f} MiB"
    assert probe["loaded"] > 0.9 * store_bytes > cap  # the probe would catch a whole-store load


def test_training_from_the_store_resumes_bit_identically(tmp_path: Path) -> None:
    """End to end with ``topk_sae.train``: a run killed mid-epoch and resumed from its checkpoint
    ends with the same weights as an uninterrupted run, both streaming from the store."""
    path = tmp_path / "store"
    with FeatureStoreWriter(path, 6, shard_rows=40) as w:
        w.append(torch.randn(300, 6, generator=torch.Generator().manual_seed(0)).relu() + 0.1)
    store = ShardedFeatureStore(path)
    cfg = TrainConfig(
        n_latents=24, k=2, epochs=2.5, lr=1e-2, warmup_epochs=0.5, hold_epochs=0.5, k_aux=4,
        checkpoint_every=3, progress=False, log_every=1,
    )  # fmt: skip

    def source() -> StoreSource:
        return store.source(32, seed=7, shuffle_buffer_rows=64, block_rows=16)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "uncentred features" diagnostic
        reference = train(cfg, source(), out_dir=tmp_path / "ref")

        def crash(step: int, _metrics: dict) -> None:
            if step == 14:  # mid-epoch 1 (10 batches per epoch), after a checkpoint at 12
                raise RuntimeError("killed")

        with pytest.raises(RuntimeError, match="killed"):
            train(cfg, source(), out_dir=tmp_path / "run", callback=crash)
        steps: list[int] = []
        resumed = train(
            cfg, source(), out_dir=tmp_path / "run", callback=lambda s, _m: steps.append(s)
        )
    assert 12 <= steps[0] <= 14  # continued from the checkpoint, mid-epoch, not from scratch
    assert torch.equal(resumed.model.W_enc, reference.model.W_enc)
    assert torch.equal(resumed.model.W_dec, reference.model.W_dec)
    assert resumed.history == reference.history


def test_attributes_are_stored_committed_with_shards_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "store"
    w = FeatureStoreWriter(path, 3, shard_rows=4, attributes={"layer": "layer4", "m": (1, 2)})
    w.append(torch.ones(4, 3))  # one full shard -> manifest written with the attributes
    w.attributes["progress"] = 7
    w.append(torch.ones(2, 3))  # pending only: "progress" not yet committed
    del w  # simulated crash: pending rows and the unsaved attribute change are lost
    store = ShardedFeatureStore(path, allow_incomplete=True)
    assert store.attributes == {"layer": "layer4", "m": [1, 2]}
    assert store.num_rows == 4
    # Reopening with equal attributes (tuples compare as lists) appends; a clash is refused.
    w = FeatureStoreWriter(path, 3, shard_rows=4, attributes={"layer": "layer4", "m": (1, 2)})
    w.attributes["progress"] = 9
    w.append(torch.zeros(4, 3))
    w.close()
    assert ShardedFeatureStore(path).attributes["progress"] == 9
    with pytest.raises(ValueError, match=r"attributes \['layer'\] differ"):
        FeatureStoreWriter(path, 3, shard_rows=4, attributes={"layer": "layer3"})
    with pytest.raises(TypeError, match="JSON"):
        FeatureStoreWriter(tmp_path / "other", 3, attributes={"x": object()})
