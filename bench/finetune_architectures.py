"""Training throughput of each fine-tuning architecture on this machine, side by side.

    .venv/bin/python bench/finetune_architectures.py [--size 224] [--batch 8] [--seconds 20] [--device cpu|cuda]

For each architecture (common/models/architectures.py) on its backbone, and the plain classifier on the same
backbone, times full training steps (forward, the architecture's loss, backward, Adam) on random
inputs of --size px (decoding excluded: it is the same for every model), after two warm-up steps,
and prints images/s and the ratio to the plain classifier of that backbone. Random weights:
throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.models.architectures import build_model, training_loss  # noqa: E402
from common.models.inference import autocast, resolve_precision  # noqa: E402
from common.training.losses import bce  # noqa: E402

RUNS = [("classifier", "densenet121"), ("wang2017", "densenet121"), ("space-attention", "densenet121"),
        ("bilinear", "densenet121"), ("classifier", "resnet50"), ("attention-gated", "resnet50"),
        ("wang2017", "resnet50")]


def images_per_second(name: str, backbone: str, size: int, batch: int, seconds: float, device: torch.device,
                      precision: str) -> float:
    model = build_model(name, backbone, None, 0, 14).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 14, device=device) < 0.2).float()
    mask = torch.ones_like(y)

    def step():
        with autocast(device.type, precision):
            outputs = model(x)
        loss = training_loss(model, outputs, y, mask, bce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision("auto", device.type)
    print(f"training steps at {args.size} px, batch {args.batch}, {device} ({precision}), "
          f"{torch.get_num_threads()} threads, {args.seconds:g} s each", flush=True)
    rates = {}
    for name, backbone in RUNS:
        rates[(name, backbone)] = images_per_second(name, backbone, args.size, args.batch, args.seconds, device,
                                                    precision)
        print(f"  {name} on {backbone}: {rates[(name, backbone)]:.2f} images/s", flush=True)
    print("\n| model | backbone | images/s | x classifier |\n| --- | --- | --- | --- |")
    for (name, backbone), rate in rates.items():
        print(f"| {name} | {backbone} | {rate:.2f} | {rate / rates[('classifier', backbone)]:.2f} |")


if __name__ == "__main__":
    main()
