"""Micro-batching: concurrent requests share one forward pass.

Request threads decode their own upload (Pillow, pydicom and numpy release the GIL for much of
it) and `submit` the model input; one model thread takes the first waiting input, waits at most
`wait_ms` for more, up to `max_batch`, and answers them all with one `predict` call. Under load
the backbone runs at its batch rate; alone, a request waits `wait_ms` at most. The model is
touched by that one thread only, so it needs no lock.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass


@dataclass
class _Job:
    inputs: object
    image_id: str
    future: Future
    queued: float


class Batcher:
    def __init__(self, predict, max_batch: int = 16, wait_ms: float = 10.0):
        """`predict(inputs: list, ids: list[str])` -> an object with per-row fields (heads.predictions.ImagePredictions)."""
        if max_batch < 1 or wait_ms < 0:
            raise ValueError(f"batching: max_batch {max_batch} must be >= 1 and wait_ms {wait_ms} >= 0")
        self._predict, self.max_batch, self.wait = predict, max_batch, wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self.batches = self.images = 0  # served so far, for /api/health
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    def submit(self, inputs, image_id: str) -> Future:
        """A future of (batch result, row index in it, seconds the input waited, batch size)."""
        job = _Job(inputs, image_id, Future(), time.perf_counter())
        self._queue.put(job)
        return job.future

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _take(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.perf_counter() + self.wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # closing: answer what is here, then stop
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            started = time.perf_counter()
            try:
                result = self._predict([j.inputs for j in batch], [j.image_id for j in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the thread goes on
                for job in batch:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            for row, job in enumerate(batch):
                job.future.set_result((result, row, started - job.queued, len(batch)))
