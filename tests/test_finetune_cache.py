"""The fine-tuning decode cache (finetune/decode_cache.py): the same inputs as decoding, built once, never stale or half."""

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data_config import DataConfig
from finetune import decode_cache
from finetune.dataset import ImageDataset
from finetune.decode_cache import BUILDING, open_cache
from tests.data_paths import NIH_IMAGES, needs_shared


@pytest.fixture
def images(tmp_path):
    """8-bit, 16-bit, RGB and non-square PNGs, a JPEG, a truncated file and a missing one."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for k in range(6):
        p = folder / f"gray{k}.png"
        Image.fromarray(rng.integers(0, 256, (90 + 7 * k, 120), dtype=np.uint8)).save(p)
        paths.append(p)
    p = folder / "deep.png"
    Image.fromarray(rng.integers(0, 65536, (100, 100), dtype=np.uint16)).save(p)  # 16-bit: no 8-bit rounding
    paths.append(p)
    p = folder / "color.jpg"
    Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(p)
    paths.append(p)
    (folder / "cut.png").write_bytes(paths[0].read_bytes()[:200])
    paths += [folder / "cut.png", folder / "missing.png"]
    return [str(p) for p in paths]


@pytest.fixture
def loads(monkeypatch):
    """How many times DataConfig.load ran in this process (the builds below decode in-process)."""
    count = {"n": 0}
    real = DataConfig.load

    def counted(self, path, *args, **kwargs):
        count["n"] += 1
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(DataConfig, "load", counted)
    return count


def uncached(cfg, path):
    try:
        return cfg.load(path)
    except Exception:
        return None


def test_cached_inputs_equal_decoded_ones_bit_for_bit(images, tmp_path):
    cfg = DataConfig(32, resize="crop", crop_pct=0.875, interpolation="bicubic")
    cache = open_cache(images, cfg, tmp_path / "cache", workers=2, log=lambda m: None)
    assert cache.ok.tolist() == [True] * 8 + [False, False]
    for i, path in enumerate(images):
        want = uncached(cfg, path)
        assert (cache.get(i) is None) if want is None else np.array_equal(cache.get(i), want) and \
            cache.get(i).dtype == np.float32
    # ...so the datasets' items, eval and training views alike, are the same tensors.
    y, m = np.zeros((len(images), 2)), np.ones((len(images), 2))
    for train in (False, True):
        plain = ImageDataset(images, y, m, cfg, train=train, seed=3)
        cached = ImageDataset(images, y, m, cfg, train=train, seed=3, cache=cache)
        for epoch in (0, 1):
            plain.epoch = cached.epoch = epoch
            for i in range(len(images)):
                a, b = plain[i], cached[i]
                assert torch.equal(a[0], b[0]) and a[3] == b[3] and a[4] == b[4]
    assert cached[8][3] is False and torch.equal(cached[8][0], torch.zeros(3, 32, 32))


@needs_shared
def test_cached_nih_inputs_equal_decoded_ones(tmp_path):
    paths = [str(p) for p in sorted(NIH_IMAGES.glob("*.png"))[:6]]
    cfg = DataConfig(64)
    cache = open_cache(paths, cfg, tmp_path, log=lambda m: None)
    assert all(np.array_equal(cache.get(i), cfg.load(p)) for i, p in enumerate(paths))


def test_a_second_open_reads_the_cache_without_decoding(images, tmp_path, loads, capsys):
    cfg = DataConfig(24)
    open_cache(images, cfg, tmp_path, progress_seconds=1e-9)
    assert loads["n"] == len(images)
    err = capsys.readouterr().out
    assert "decode cache: building" in err and f"{len(images)} images to decode" in err and "2 unreadable" in err
    again = open_cache(images, cfg, tmp_path)
    assert loads["n"] == len(images) and np.array_equal(again.ok, open_cache(images, cfg, tmp_path).ok)
    assert "decode cache: reading" in capsys.readouterr().out


def test_another_data_config_or_a_changed_file_never_reads_a_stale_cache(images, tmp_path, loads):
    cfg = DataConfig(24)
    first = open_cache(images, cfg, tmp_path, log=lambda m: None)
    for other in (DataConfig(32), DataConfig(24, resize="stretch"), DataConfig(24, interpolation="bicubic"),
                  DataConfig(24, mean=(0.5,) * 3)):
        loads["n"] = 0
        cache = open_cache(images, other, tmp_path, log=lambda m: None)
        assert loads["n"] == len(images) and cache.folder != first.folder
        assert all(np.array_equal(cache.get(i), other.load(p)) for i, p in enumerate(images[:8]))
    # One file rewritten: a new cache, in which only it (and the two unreadable ones) is decoded again.
    Image.fromarray(np.full((50, 50), 200, np.uint8)).save(images[2])
    loads["n"] = 0
    cache = open_cache(images, cfg, tmp_path, log=lambda m: None)
    assert cache.folder != first.folder and loads["n"] == 3
    assert all(np.array_equal(cache.get(i), cfg.load(p)) for i, p in enumerate(images[:8]))
    assert np.allclose(cache.get(2), 200 / 255)  # the new content


def _killed_build(images, directory):
    def die_at_the_fifth(self, path, *args, **kwargs):
        die_at_the_fifth.n += 1
        if die_at_the_fifth.n == 5:
            os._exit(9)  # as a kill: no cleanup, no exception handlers
        return DataConfig._real_load(self, path, *args, **kwargs)

    die_at_the_fifth.n = 0
    DataConfig._real_load = DataConfig.load
    DataConfig.load = die_at_the_fifth
    open_cache(images, DataConfig(24), directory, log=lambda m: None)


def test_a_killed_build_leaves_no_cache_that_is_read_as_complete(images, tmp_path, loads):
    cache_dir = tmp_path / "cache"
    child = multiprocessing.get_context("fork").Process(target=_killed_build, args=(images, cache_dir))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    left = [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")]
    assert len(left) == 1 and left[0].startswith(BUILDING)  # half a cache, under its temporary name only
    cache = open_cache(images, DataConfig(24), cache_dir, log=lambda m: None)
    assert loads["n"] == len(images)  # all decoded, none taken from the half
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")) == [cache.folder.name]
    # A final folder whose files do not read (damaged by hand or by the disk) is built again too.
    (cache.folder / "values.npy").write_bytes(b"junk")
    loads["n"] = 0
    again = open_cache(images, DataConfig(24), cache_dir, log=lambda m: None)
    assert loads["n"] == len(images) and again.folder == cache.folder
    assert np.array_equal(again.get(0), DataConfig(24).load(images[0]))


def _open_counted(images, directory, counter, start):
    real = DataConfig.load

    def slow(self, path, *args, **kwargs):
        with counter.get_lock():
            counter.value += 1
        import time

        time.sleep(0.05)
        return real(self, path, *args, **kwargs)

    DataConfig.load = slow
    start.wait()
    cache = open_cache(images, DataConfig(24), directory, log=lambda m: None)
    os._exit(0 if cache is not None and np.array_equal(cache.get(0), real(DataConfig(24), images[0])) else 1)


def test_processes_opening_one_cache_at_once_decode_each_image_once(images, tmp_path):
    cache_dir = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    counter, start = ctx.Value("i", 0), ctx.Event()
    procs = [ctx.Process(target=_open_counted, args=(images, cache_dir, counter, start)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.value == len(images)  # one built it, two waited and read it
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1


def test_a_cache_that_cannot_be_written_falls_back_to_decoding(images, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert open_cache(images, DataConfig(24), tmp_path / "file" / "cache") is None
    assert "decoding every image every epoch instead" in capsys.readouterr().out

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "c" / "values.npy"))

    monkeypatch.setattr(np.lib.format, "open_memmap", full)
    assert open_cache(images, DataConfig(24), tmp_path / "c") is None
    assert "no space left on device; decoding every image" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []  # nothing half left


def test_the_cache_pickles_without_its_values_for_worker_processes(images, tmp_path):
    import pickle

    cache = open_cache(images, DataConfig(24), tmp_path, log=lambda m: None)
    cache.get(0)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._values is None and len(pickle.dumps(cache)) < 10_000
    assert np.array_equal(copy.get(0), cache.get(0))


def test_the_job_flags_name_the_cache_folder(tmp_path):
    from finetune.run import decode_cache_dir
    from jobs import finetune as job

    parse = job.build_parser().parse_args
    assert decode_cache_dir(parse(["--out", "runs/x"])) == str(Path("runs").resolve() / decode_cache.DEFAULT_DIR)
    assert decode_cache_dir(parse(["--out", "runs/x", "--decode-cache", "fast"])) == str(Path("fast").resolve())
    assert decode_cache_dir(parse(["--out", "runs/x", "--no-decode-cache"])) is None
