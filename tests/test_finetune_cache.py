"""The fine-tuning decode cache (finetune/decode_cache.py): the same inputs as decoding, built once, never stale or half."""

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.images.data_config import DataConfig
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


def _open_counted(images, directory, counter, arrived, start):
    real = DataConfig.load
    held = []

    def counted(self, path, *args, **kwargs):
        with counter.get_lock():
            counter.value += 1
        if not held:  # the builder's first image waits until the other two wait on its lock: they overlap every time
            held.append(path)
            arrived.wait(60)  # a bound against a hang: BrokenBarrierError, exit code 1
        return real(self, path, *args, **kwargs)

    def log(message):
        if "waiting for another process building" in message:
            arrived.wait(60)

    DataConfig.load = counted
    start.wait()
    cache = open_cache(images, DataConfig(24), directory, log=log)
    os._exit(0 if cache is not None and np.array_equal(cache.get(0), real(DataConfig(24), images[0])) else 1)


def test_processes_opening_one_cache_at_once_decode_each_image_once(images, tmp_path):
    cache_dir = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    counter, arrived, start = ctx.Value("i", 0), ctx.Barrier(3), ctx.Event()
    procs = [ctx.Process(target=_open_counted, args=(images, cache_dir, counter, arrived, start)) for _ in range(3)]
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
    from jobs import fine_tune as job

    def settings(*flags):
        return job.settings_from(job.build_parser().parse_args(["--metadata", "m.csv", "--images", "i", *flags]))

    assert decode_cache_dir(settings("--out", "runs/x")) == str(Path("runs").resolve() / decode_cache.DEFAULT_DIR)
    assert decode_cache_dir(settings("--out", "runs/x", "--decode-cache", "fast")) == str(Path("fast").resolve())
    assert decode_cache_dir(settings("--out", "runs/x", "--no-decode-cache")) is None


def _overwrite_rows(values_path: Path, rows: dict) -> None:
    """Write over rows of values.npy in place: the same size, the same mtime, other bytes."""
    st = values_path.stat()
    values = np.load(values_path, mmap_mode="r+")
    for row, new in rows.items():
        values[row] = new
    values.flush()
    del values
    os.utime(values_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert values_path.stat().st_size == st.st_size


def test_a_cache_changed_on_disk_is_detected_and_rebuilt_from_its_intact_rows(images, tmp_path, loads):
    cfg, lines = DataConfig(24), []
    cache = open_cache(images, cfg, tmp_path, log=lambda m: None)
    noise = np.random.default_rng(1).random((12, 24), dtype=np.float32)  # finite values in [0, 1]: plausible ones
    _overwrite_rows(cache.folder / "values.npy", {1: 0.0, 4: np.vstack([noise, cache.get(4)[12:]])})
    loads["n"] = 0
    again = open_cache(images, cfg, tmp_path, log=lines.append)
    damaged = [m for m in lines if "2 of 10 rows" in m and str(cache.folder) in m]
    assert len(damaged) == 1 and "building it again" in damaged[0], lines
    assert loads["n"] == 4  # the two changed rows and the two unreadable files; the other six copied
    assert again.folder == cache.folder and all(np.array_equal(again.get(i), cfg.load(p))
                                                for i, p in enumerate(images[:8]))


def test_a_changed_row_of_an_earlier_cache_is_not_copied_into_a_new_one(images, tmp_path, loads):
    cfg = DataConfig(24)
    first = open_cache(images, cfg, tmp_path, log=lambda m: None)
    _overwrite_rows(first.folder / "values.npy", {3: 0.5})
    Image.fromarray(np.full((50, 50), 200, np.uint8)).save(images[2])  # a new image list: a new cache
    loads["n"] = 0
    cache = open_cache(images, cfg, tmp_path, log=lambda m: None)
    assert cache.folder != first.folder and loads["n"] == 4  # images 2 and 3, and the two unreadable ones
    assert all(np.array_equal(cache.get(i), cfg.load(p)) for i, p in enumerate(images[:8]))


def test_the_cache_key_is_computed_when_the_packages_are_imported_from_a_zip(tmp_path):
    # As under spark-submit --py-files build/cxr_features.zip: no module has a file of its own.
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    shipped = tmp_path / "cxr_features.zip"
    with zipfile.ZipFile(shipped, "w") as z:
        for package in ("common", "finetune"):
            for f in sorted((repo / package).rglob("*.py")):
                z.write(f, f.relative_to(repo))
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import common.images.decode, finetune.decode_cache as c\n"
            "from common.images.data_config import DataConfig\n"
            "assert c.__file__.startswith(sys.argv[1]) and common.images.decode.__file__.startswith(sys.argv[1])\n"
            "print(c.config_digest(DataConfig(24)))")
    run = subprocess.run([sys.executable, "-c", code, str(shipped)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == decode_cache.config_digest(DataConfig(24))  # the same key as from the checkout


# Digests of the decoded inputs of the files below, by common.images.decode.DECODE_VERSION. A change to what
# decoding gives (common/images/decode.py, common/images/dicom.py, DataConfig.load) that keeps the version would let
# caches built before it be read as current: bump DECODE_VERSION and record the new digest here. (A
# Pillow, NumPy or pydicom upgrade that changes them re-keys the caches by itself: only re-record.)
DECODED_DIGESTS = {1: "1fd1eb2923cd094676a0e18d4735326b3d42b7cb73e799eb49e523885ba0f988"}


def _fixed_images(folder: Path) -> list[Path]:
    """8-bit and 16-bit PNG, an RGB JPEG big enough for a reduced-scale decode, a 12-bit rescaled
    MONOCHROME1 DICOM: pixels from formulas, not from a random generator whose stream may change."""
    from tests.test_dicom import write_dicom

    y, x = np.mgrid[0:90, 0:120]
    files = {"gray8.png": ((x * 37 + y * 11 + (x * y) % 7) % 256).astype(np.uint8),
             "gray16.png": ((x * 1009 + y * 577 + x * y * 3) % 65536).astype(np.uint16)}
    for name, pixels in files.items():
        Image.fromarray(pixels).save(folder / name)
    y, x = np.mgrid[0:200, 0:160]
    rgb = np.stack([(x + y) % 256, (2 * x + 40) % 256, (x * y // 64) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "color.jpg", quality=90)
    y, x = np.mgrid[0:64, 0:80]
    write_dicom(folder / "mono1.dcm", ((x * 53 + y * 29) % 4096).astype(np.uint16), "MONOCHROME1", 12,
                RescaleSlope=2, RescaleIntercept=-100)
    return [folder / name for name in ("gray8.png", "gray16.png", "color.jpg", "mono1.dcm")]


def test_decoding_gives_the_values_recorded_for_its_decode_version(tmp_path):
    import hashlib

    from common.images.decode import DECODE_VERSION

    digest = hashlib.sha256()
    for cfg in (DataConfig(32), DataConfig(40, resize="crop", crop_pct=0.875, interpolation="bicubic")):
        for path in _fixed_images(tmp_path):
            values = cfg.load(str(path))  # what a cache row holds
            digest.update(np.rint(values.astype(np.float64) * 1e6).astype(np.int64).tobytes())  # robust to 1e-7
    assert digest.hexdigest() == DECODED_DIGESTS.get(DECODE_VERSION), (
        f"decoding changed: bump DECODE_VERSION in common/images/decode.py and record {digest.hexdigest()} for it here")


def test_building_a_cache_leaves_the_global_random_state_alone(images, tmp_path):
    # The run that builds the cache must train with the dropout masks of the runs that read it.
    import torch

    torch.manual_seed(7)
    before = torch.get_rng_state()
    assert open_cache(images, DataConfig(32), tmp_path, log=lambda m: None) is not None
    assert torch.equal(torch.get_rng_state(), before)
