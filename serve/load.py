"""A bounded load on a running service: N uploads, C at once, good and bad mixed (bench/serve_load.py, tests).

Only for a service the caller runs on this machine (127.0.0.1): the count and concurrency are fixed
up front, and every request has a timeout, so a load always ends by itself.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass
class Upload:
    body: bytes
    content_type: str
    good: bool  # expected to be answered 200; a bad one must get a 4xx


@dataclass
class Outcome:
    good: bool
    status: int
    seconds: float
    answer: bytes


def post(url: str, upload: Upload, timeout: float = 60.0) -> Outcome:
    request = urllib.request.Request(f"{url}/api/predict", data=upload.body, method="POST",
                                     headers={"Content-Type": upload.content_type})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read()
    except OSError as exc:  # refused, reset, timed out: no HTTP status at all
        status, answer = 0, str(exc).encode()
    return Outcome(upload.good, status, time.perf_counter() - start, answer)


def run_load(url: str, uploads: list[Upload], concurrency: int, timeout: float = 60.0) -> tuple[list[Outcome], float]:
    """Every upload once, `concurrency` at a time; the outcomes in upload order and the wall time."""
    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError(f"{url}: load only a service on this machine (loopback)")
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda u: post(url, u, timeout), uploads))
    return outcomes, time.perf_counter() - start


def summary(outcomes: list[Outcome], seconds: float) -> dict:
    good = [o for o in outcomes if o.good]
    latency = np.array([o.seconds for o in good]) * 1000
    return {
        "requests": len(outcomes), "seconds": seconds, "requests_per_s": len(outcomes) / seconds,
        "good_ok": sum(o.status == 200 for o in good), "good_failed": sum(o.status != 200 for o in good),
        "bad_4xx": sum(400 <= o.status < 500 for o in outcomes if not o.good),
        "bad_not_4xx": sum(not 400 <= o.status < 500 for o in outcomes if not o.good),
        "p50_ms": float(np.percentile(latency, 50)) if len(latency) else None,
        "p95_ms": float(np.percentile(latency, 95)) if len(latency) else None,
    }
