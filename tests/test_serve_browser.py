"""The diagnosis page in a real browser: headless Chromium (Debian's package) driven by Playwright.

A server started on 127.0.0.1 serves the page; the test uploads a shared NIH image through the file
picker, waits for the findings table and checks every row against the API's answer for the same
file. The screenshot is kept as an artifact in test-artifacts/. Without a browser the test is
skipped with a loud reason (run with -rs, as `make test` does), never passed.
"""

import os
import shutil
import urllib.request
import warnings
from pathlib import Path

import pytest

from tests.data_paths import NIH_IMAGES, REPO, needs_shared
from tests.serve_fixtures import LiveServer, finetune_run, head_run

pytestmark = [pytest.mark.browser, needs_shared, pytest.mark.usefixtures("one_torch_thread")]
CHROMIUM = os.environ.get("CXR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"
# As a root user on a machine with no network: no sandbox, no background connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _browser_or_skip():
    reason = None
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        reason = "no chromium executable (apt-get install chromium; `make test` installs it as root)"
    if reason:
        message = f"BROWSER TEST NOT RUN: {reason}"
        warnings.warn(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_torch_thread):
    _browser_or_skip()
    live = LiveServer(head_run(tmp_path_factory.mktemp("browser")))
    yield live
    live.close()


def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


def test_page_uploads_an_image_and_shows_the_apis_findings(server, tmp_path):
    import json

    from playwright.sync_api import sync_playwright

    image = sorted(NIH_IMAGES.glob("*.png"))[0]
    with open(image, "rb") as f:
        body = f.read()
    request = urllib.request.Request(f"{server.url}/api/predict?name={image.name}", data=body,
                                     headers={"Content-Type": "image/png"})
    expected = json.loads(urllib.request.urlopen(request, timeout=60).read())

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            outside = []
            page.on("request", lambda r: None if r.url.startswith(server.url) or r.url.startswith("data:")
                    else outside.append(r.url))
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelectorAll('#model dd').length > 0")
            assert "not a medical device" in page.inner_text("#notice")
            assert "resnet50" in page.inner_text("#model")
            # The headline with its split, n and interval; the random backbone's warning in the banner; the card.
            model_text = page.inner_text("#model")
            page.wait_for_function("document.getElementById('card-text').textContent.length > 0")
            banner = page.inner_text("#warnings") if page.is_visible("#warnings") else ""
            card = page.text_content("#card-text")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#findings tbody tr", timeout=60_000)
            rows = page.eval_on_selector_all(
                "#findings tbody tr",
                "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent, r.cells[2].textContent, "
                "r.className])")
            assert "No heatmap" in page.inner_text("#cam-note")
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)

            # A bad file after a good one: nothing of the good one stays under the bad one's error.
            page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
            page.wait_for_selector("#error:not([hidden])")
            assert "cannot read the upload" in page.inner_text("#error")
            left = page.evaluate("""() => ({
                result: !document.getElementById('result').hidden,
                rows: document.querySelectorAll('#findings tbody tr').length,
                image: document.getElementById('image').getAttribute('src'),
                caption: document.getElementById('caption').textContent })""")
        finally:
            browser.close()
    assert left == {"result": False, "rows": 0, "image": None, "caption": ""}, left
    assert outside == []  # every script and style came from the service itself
    assert "val mean AUROC" in model_text and "95% CI" in model_text and "on 30 val images" in model_text
    assert "random weights" in banner and "no test split" in banner
    assert card.startswith("# Model card") and "**WARNING: random weights" in card
    assert [r[0] for r in rows] == [f["name"] for f in expected["findings"]]
    for (name, prob, threshold, cls), f in zip(rows, expected["findings"]):
        assert float(prob) == pytest.approx(f["probability"], abs=1e-4)
        assert float(threshold.split()[0]) == pytest.approx(f["threshold"], abs=1e-4)
        assert threshold.endswith("(fallback)") == f["threshold_source"].startswith("fallback")
        assert (cls == "above") == f["above_threshold"]
    assert Path(ARTIFACTS / "serve-page.png").stat().st_size > 10_000


def test_a_finetune_run_draws_the_chosen_findings_heatmap(tmp_path_factory, one_torch_thread):
    from playwright.sync_api import sync_playwright

    _browser_or_skip()
    live = LiveServer(finetune_run(tmp_path_factory.mktemp("browser-ft")))
    image = sorted(NIH_IMAGES.glob("*.png"))[1]
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 1000})
                page.goto(live.url + "/")
                page.wait_for_function("document.querySelectorAll('#model dd').length > 0")
                page.set_input_files("#file", str(image))
                page.wait_for_selector("#cam-controls:not([hidden])", timeout=60_000)
                options = page.eval_on_selector_all("#cam-class option", "o => o.map(x => x.value)")
                first_row = page.inner_text("#findings tbody tr td")
                page.wait_for_function("document.getElementById('heatmap').width > 0")
                painted = page.evaluate("""() => {
                    const c = document.getElementById('heatmap');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                    return n / (c.width * c.height); }""")
                # viridis, never jet's red end: no strongly red pixel; and its colour scale is shown beside it.
                red = page.evaluate("""() => {
                    const c = document.getElementById('heatmap');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 150 && d[i + 1] < 80) n++;
                    return n; }""")
                scale = page.evaluate("getComputedStyle(document.getElementById('cam-scale-bar')).backgroundImage")
                page.screenshot(path=str(ARTIFACTS / "serve-page-cam.png"), full_page=True)
                page.uncheck("#cam-show")
                cleared = page.evaluate("""() => {
                    const c = document.getElementById('heatmap');
                    return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0); }""")
                # A bad file next: its error shows alone, without the previous film's heatmap or findings.
                page.check("#cam-show")
                page.set_input_files("#file", {"name": "bad.png", "mimeType": "image/png", "buffer": b"junk"})
                page.wait_for_selector("#error:not([hidden])")
                after_bad = page.evaluate("""() => {
                    const c = document.getElementById('heatmap');
                    const painted = c.width > 0 && c.height > 0
                        && c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0);
                    return {painted, result: !document.getElementById('result').hidden,
                            options: document.querySelectorAll('#cam-class option').length}; }""")
            finally:
                browser.close()
    finally:
        live.close()
    assert sorted(options) == sorted(live.served.label_names) and options[0] == first_row  # most likely first
    assert painted > 0.99 and not cleared  # the map covers the image, and hides on request
    assert red == 0 and "linear-gradient" in scale and "rgb(68, 1, 84)" in scale
    assert after_bad == {"painted": False, "result": False, "options": 0}, after_bad
