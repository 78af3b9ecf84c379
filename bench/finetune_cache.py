"""Fine-tuning epoch time with and without the decode cache, on the real 1024-px NIH PNGs in ../shared/data.

    .venv/bin/python bench/finetune_cache.py [--size 64] [--backbone mobilenet_v3_large] [--epochs 2]
                                             [--workers 2] [--threads N] [--images DIR] [--cache-dir DIR]
    .venv/bin/python bench/finetune_cache.py --digest-cost 224 512 [--workers 2]

From one run, side by side, on the same images, split 80/20 into train and val:
  (a) the data loading of one training epoch alone (the DataLoader over the train images: decode or
      cache read, random shift and flip, normalization), without and with the cache
  (b) whole training epochs (finetune.loop.train: forward, backward, Adam, then validation), random
      weights, without the cache and then with it (reading the cache built in between)
  (c) the cache build (finetune.decode_cache.open_cache, train and val)
and the ratios. The cache folder is a temporary one unless --cache-dir names one (then it is kept).

--digest-cost S...: only the integrity check that opening a cache runs (the SHA-256 of every row,
against the digests written at build time), on synthetic rows of S x S float32 in a temporary .npy
read memory-mapped from the page cache (a cold disk adds the file's size over its read speed), in 1
and in --workers threads, the least time of 3 runs, per image and for 100,000 images; beside it, what
one cached training item costs (row copy, random shift and flip, normalization), to which a check
of each row as it is read would add the check's time, every epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.images.data_config import DataConfig  # noqa: E402
from finetune.config import FinetuneConfig, SplitImages  # noqa: E402
from finetune.decode_cache import _digests, open_cache  # noqa: E402
from finetune.loop import train  # noqa: E402
from finetune.sampler import EpochSampler  # noqa: E402

NIH = REPO.parent / "shared" / "data" / "nih"


def split(paths: list[str], k: int, rng: np.random.Generator) -> SplitImages:
    return SplitImages([Path(p).name for p in paths], paths, (rng.random((len(paths), k)) < 0.2).astype(np.float32),
                       np.ones((len(paths), k), bool))


def loading_seconds(images: SplitImages, cfg: DataConfig, batch: int, workers: int, cache) -> float:
    """One epoch of the training DataLoader, nothing done with the batches."""
    ds = images.dataset(cfg, train=True, seed=0, cache=cache)
    sampler = EpochSampler(len(ds), batch)
    sampler.set_epoch(1)
    start = time.perf_counter()
    for _ in DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers):
        pass
    return time.perf_counter() - start


def epoch_seconds(cfg: FinetuneConfig) -> list[float]:
    Path(cfg.out).mkdir()
    return [h["seconds"] for h in train(cfg)["history"]]


def best_of(repeats: int, work) -> float:
    """The least wall time of `repeats` runs of work(): the one least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def digest_cost(sizes: list[int], threads: int, n: int = 400) -> None:
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {n} rows a size")
    print(f"| input size | row | check, 1 thread | check, 100k images | check, {threads} threads | 100k images "
          "| cached training item |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = Path(tmp) / f"values-{size}.npy"
            values = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, size, size))
            values[:] = np.random.default_rng(0).random((n, size, size), dtype=np.float32)
            values.flush()
            del values
            values = np.load(path, mmap_mode="r")
            _digests(values, 1)  # into the page cache
            per = {t: best_of(3, lambda: _digests(values, t)) / n for t in (1, threads)}
            cfg, rng = DataConfig(size), np.random.default_rng(0)
            item = best_of(3, lambda: [cfg.to_tensor(cfg.train_view(np.array(row), rng)[None]) for row in values])
            item /= n
            print(f"| {size} px | {size * size * 4 / 1e6:.2f} MB | {per[1] * 1e3:.3f} ms | {per[1] * 1e5:.0f} s "
                  f"| {per[threads] * 1e3:.3f} ms | {per[threads] * 1e5:.0f} s | {item * 1e3:.3f} ms |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=str(NIH / "images"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--backbone", default="mobilenet_v3_large", help="a registry backbone, random weights")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes (the job's --num-workers)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of training (the job's --threads; "
                                                             "default: cores)")
    p.add_argument("--cache-dir", help="where to build the cache (default: a temporary folder, deleted)")
    p.add_argument("--digest-cost", type=int, nargs="+", metavar="SIZE",
                   help="time only the integrity check of a cache's rows at these input sizes")
    args = p.parse_args()
    if args.digest_cost:
        return digest_cost(args.digest_cost, args.workers)

    paths = sorted(str(f) for f in Path(args.images).glob("*.png"))
    if not paths:
        sys.exit(f"no PNG images in {args.images}")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    n_train = int(0.8 * len(paths))
    tr = split([paths[i] for i in order[:n_train]], 14, rng)
    va = split([paths[i] for i in order[n_train:]], 14, rng)
    data_config = DataConfig(args.size)
    print(f"{len(paths)} images ({len(tr)} train, {len(va)} val) at {args.size} px, {args.backbone} (random weights), "
          f"batch {args.batch}, {args.workers} DataLoader workers, {args.threads or os.cpu_count()} training threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch "
          f"{torch.__version__}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(args.cache_dir or Path(tmp) / "cache")
        cfg = FinetuneConfig(out=str(Path(tmp) / "run-plain"), backbone=args.backbone, label_names=[str(k) for k in range(14)],
                             train=tr, val=va, data_config=data_config, lr=1e-3, batch_size=args.batch,
                             epochs=args.epochs, early_stop_patience=0, num_workers=args.workers,
                             threads=args.threads, log_every=0,
                             log_seconds=0, checkpoint_every=0, loss="bce", precision="fp32")

        load_plain = loading_seconds(tr, data_config, args.batch, args.workers, None)
        print(f"  data loading, no cache: {load_plain:.2f} s", flush=True)
        plain = epoch_seconds(cfg)
        print(f"  training epochs, no cache: {', '.join(f'{s:.2f}' for s in plain)} s", flush=True)

        start = time.perf_counter()
        caches = [open_cache(s.paths, data_config, cache_dir, args.workers, log=lambda m: print("  " + m, flush=True),
                             progress_seconds=0) for s in (tr, va)]
        build = time.perf_counter() - start
        load_cached = loading_seconds(tr, data_config, args.batch, args.workers, caches[0])
        print(f"  data loading, cached: {load_cached:.2f} s", flush=True)
        cfg.out, cfg.decode_cache = str(Path(tmp) / "run-cached"), str(cache_dir)
        cached = epoch_seconds(cfg)
        print(f"  training epochs, cached: {', '.join(f'{s:.2f}' for s in cached)} s", flush=True)

    mean_plain, mean_cached = float(np.mean(plain)), float(np.mean(cached))
    print(f"\n| {len(paths)} NIH images at {args.size} px | no cache | cached | no cache / cached |")
    print("| --- | --- | --- | --- |")
    print(f"| cache build (train + val, once) | | {build:.2f} s | |")
    print(f"| data loading of one train epoch ({len(tr)} images) | {load_plain:.2f} s | {load_cached:.2f} s "
          f"| {load_plain / load_cached:.1f}x |")
    print(f"| training epoch, {args.backbone} (mean of {args.epochs}, val included) | {mean_plain:.2f} s "
          f"| {mean_cached:.2f} s | {mean_plain / mean_cached:.1f}x |")


if __name__ == "__main__":
    main()
