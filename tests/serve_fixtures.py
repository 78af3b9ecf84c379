"""A trained head run and a fine-tune run to serve, and a live server on 127.0.0.1 for the page tests."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from common.images.data_config import DataConfig
from tests.data_paths import SAMPLE
from tests.heads_fixtures import synthetic_rows, write_store

# Random ResNet-50 features differ between images (random MobileNet's barely do); 64 px keeps it fast.
BACKBONE, SIZE = "resnet50", 64


def head_run(root: Path, backbone: str = BACKBONE, size: int = SIZE) -> Path:
    """A head trained on a synthetic store whose manifest names a random `backbone` at `size` px."""
    from common.models.model_registry import get_spec
    from heads import train

    rng = np.random.default_rng(0)
    dim = get_spec(backbone).feature_dim
    splits = {s: synthetic_rows(n, dim, 14, rng, signal=1.0, prefix=s) for s, n in {"train": 60, "val": 30}.items()}
    store = write_store(root / "store", splits, backbone=backbone, weights="random:0",
                        manifest_extra={"data_config": DataConfig(size).to_dict()})
    out = root / "head-run"
    train.main(["--store", str(store), "--out", str(out), "--epochs", "2", "--threads", "1", "--quiet"])
    return out


def finetune_run(root: Path) -> Path:
    """One epoch of DenseNet-121 (random init) at 64 px on the bundled 40-image NIH sample."""
    from jobs import fine_tune

    out = root / "ft-run"
    fine_tune.main(["--dataset", "nih", "--metadata", str(SAMPLE / "Data_Entry_2017_v2020.csv"),
                   "--images", str(SAMPLE / "images"), "--out", str(out), "--backbone", "densenet121",
                   "--weights", "random:0", "--input-size", str(SIZE), "--batch-size", "8", "--epochs", "1",
                   "--threads", "1", "--num-workers", "0", "--split", "ratios", "--early-stop-patience", "0"])
    return out


class LiveServer:
    """The service (waitress, as `python -m serve` runs it) on a free 127.0.0.1 port, in this process."""

    def __init__(self, run: Path, **flags):
        from serve.__main__ import build, build_parser, make_server

        argv = ["--run", str(run), "--port", "0", "--threads", "1"]
        for key, value in flags.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        args = build_parser().parse_args(argv)
        self.served, self.batcher, self.app = build(args)
        self.server = make_server(self.app, args)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def close(self):
        # Close the sockets from inside the server's loop (a thunk its trigger runs there): closed from
        # this thread, a socket can vanish under the loop's select() and its thread dies on EBADF.
        from waitress import wasyncore

        sockets = getattr(self.server, "map", None) or self.server._map
        self.server.trigger.pull_trigger(lambda: wasyncore.close_all(sockets))
        self.thread.join(timeout=30)
        self.server.task_dispatcher.shutdown()
        self.batcher.close()
