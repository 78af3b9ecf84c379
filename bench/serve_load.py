"""The diagnosis service under a bounded load on 127.0.0.1, with and without batching, side by side.

    .venv/bin/python bench/serve_load.py [--run RUN] [--backbone densenet121] [--size 224]
                                         [--requests 200] [--concurrency 16] [--bad-every 10]

Starts `python -m serve` twice on the same run (without --run: a head trained here on a synthetic
store of a random --backbone at --size px; throughput does not depend on the weights' values):
once with --max-batch 16, once with --max-batch 1. For each it measures the one-at-a-time rate
(requests sent one after another) and then --requests uploads of real NIH PNGs, --concurrency at
once, every --bad-every-th a bad upload (empty, text, truncated, oversized); it prints requests/s,
p50/p95 latency of the good requests, the failures, and the ratios. Also the backbone's own batch
rate on the same images (decoding excluded): the ceiling a loaded service approaches.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serve.load import Upload, run_load, summary  # noqa: E402

NIH = REPO.parent / "shared" / "data" / "nih" / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--run", str(run), "--port", str(port),
                             "--max-batch", str(max_batch), "--threads", str(threads), "--max-upload-mb", "4"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/health", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in 300 s")


def backbone_rate(run: Path, pngs: list[Path], batch: int, threads: int) -> float:
    """images/s of the served model alone on pre-decoded inputs, in batches of `batch`."""
    import torch

    from serve.model import load_served

    torch.set_num_threads(threads)
    served = load_served(run, threads=threads, log=lambda m: None)
    inputs = [served.decode(open(p, "rb"))[0] for p in pngs[:batch]]
    served.predict(inputs, ["x"] * len(inputs))  # warm-up
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 5:
        served.predict(inputs, ["x"] * len(inputs))
        n += len(inputs)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path)
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bad-every", type=int, default=10)
    p.add_argument("--sequential", type=int, default=30, help="requests of the one-at-a-time rate")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the server")
    args = p.parse_args()

    pngs = sorted(NIH.glob("*.png"))[:32]
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            from tests.serve_fixtures import head_run

            run = head_run(Path(tmp), args.backbone, args.size)
        bodies = [p.read_bytes() for p in pngs]
        bad = [Upload(b"", "image/png", False), Upload(b"plain text", "text/plain", False),
               Upload(bodies[0][:3000], "image/png", False), Upload(b"\0" * (5 << 20), "image/png", False)]
        uploads = [bad[(i // args.bad_every) % len(bad)] if (i + 1) % args.bad_every == 0 else
                   Upload(bodies[i % len(bodies)], "image/png", True) for i in range(args.requests)]
        print(f"run {run}; {len(pngs)} NIH PNGs (1024 px), {args.requests} requests, {args.concurrency} at once, "
              f"{sum(not u.good for u in uploads)} bad; server torch threads {args.threads}", flush=True)
        rows = []
        for max_batch in (16, 1):
            proc, url = start(run, max_batch, args.threads)
            try:
                seq, seq_s = run_load(url, [Upload(bodies[i % len(bodies)], "image/png", True)
                                            for i in range(args.sequential)], concurrency=1)
                one = summary(seq, seq_s)
                outcomes, seconds = run_load(url, uploads, args.concurrency)
                load = summary(outcomes, seconds)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            rows.append((max_batch, one, load))
        rate = backbone_rate(run, pngs, 16, args.threads)

    head = ("--max-batch", "one at a time req/s", "p50 ms", f"{args.concurrency} at once req/s", "p50 ms", "p95 ms",
            "x one at a time", "good failed", "bad 4xx / not")
    table = [head] + [(str(b), f"{o['requests_per_s']:.1f}", f"{o['p50_ms']:.0f}", f"{g['requests_per_s']:.1f}",
                       f"{g['p50_ms']:.0f}", f"{g['p95_ms']:.0f}", f"{g['requests_per_s'] / o['requests_per_s']:.2f}",
                       str(g["good_failed"]), f"{g['bad_4xx']} / {g['bad_not_4xx']}") for b, o, g in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
        if i == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")
    batched = rows[0][2]["requests_per_s"]
    print(f"\nmodel alone, batches of 16, decoded inputs: {rate:.1f} images/s; the loaded service reaches "
          f"{batched:.1f} requests/s ({batched / rate:.2f} of it; the rest is decoding 1024-px PNGs and HTTP)")
    print(f"batching: {batched / rows[1][2]['requests_per_s']:.2f}x the requests/s of --max-batch 1 under the same load")


if __name__ == "__main__":
    main()
