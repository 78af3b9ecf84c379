"""A bounded load on the live service (waitress on 127.0.0.1): 48 uploads, 8 at once, a quarter of them bad.
No good request fails, every bad one is a 4xx, answers equal the one-at-a-time ones, and the model shared batches."""

import json

import numpy as np
import pytest

from serve.load import Upload, post, run_load, summary
from tests.data_paths import NIH_IMAGES, needs_shared
from tests.serve_fixtures import LiveServer, head_run

pytestmark = [needs_shared, pytest.mark.usefixtures("one_torch_thread")]


def test_bounded_concurrent_load_with_bad_uploads(tmp_path_factory, one_torch_thread):
    live = LiveServer(head_run(tmp_path_factory.mktemp("load")), max_batch=8, wait_ms=20, max_upload_mb=2)
    try:
        pngs = [p.read_bytes() for p in sorted(NIH_IMAGES.glob("*.png"))[:6]]
        bad = [Upload(b"", "image/png", False), Upload(b"plain text", "text/plain", False),
               Upload(b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image/png", False),  # a PNG signature, nothing after
               Upload(b"\0" * (3 * 1024 * 1024), "application/octet-stream", False)]  # over --max-upload-mb
        uploads = [Upload(pngs[i % 6], "image/png", True) if i % 4 else bad[(i // 4) % 4] for i in range(48)]
        alone = {i: json.loads(post(live.url, Upload(pngs[i], "image/png", True)).answer) for i in range(6)}
        outcomes, seconds = run_load(live.url, uploads, concurrency=8)
        figures = summary(outcomes, seconds)
        health = json.loads(post(live.url, Upload(b"", "image/png", False)).answer)  # still answering
        assert "error" in health
    finally:
        live.close()
    assert figures["good_failed"] == 0 and figures["good_ok"] == 36, figures
    assert figures["bad_not_4xx"] == 0 and figures["bad_4xx"] == 12, figures
    for i, (upload, outcome) in enumerate(zip(uploads, outcomes)):
        if upload.good:
            got = json.loads(outcome.answer)["probabilities"]
            want = alone[i % 6]["probabilities"]
            np.testing.assert_allclose(list(got.values()), [want[k] for k in got], rtol=1e-4, atol=1e-6)
    assert max(json.loads(o.answer).get("batch_size", 0) for o in outcomes if o.good) > 1
