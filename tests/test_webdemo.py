"""The web demo end to end in a real headless browser (Debian's chromium driven by Selenium through the system
chromedriver): upload a bundled image, segment it with the default task and threshold, then with another task, then
with a lower mask threshold, and check the overlay and the segment table against the CLI's predict path for the same
image and settings.

Needs gradio (the ``demo`` extra), selenium (the ``test`` extra) and ``/usr/bin/chromium`` + ``/usr/bin/chromedriver``
(``.ci/run`` installs them). Skipped with the reason when one is missing, except under ``CI``, where that fails."""

from __future__ import annotations

import base64
import functools
import io
import os
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdino_hf import predict
from maskdino_hf.visualization import segment_table

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIMEOUT = 60  # seconds for any one wait in the browser


def _missing() -> str | None:
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[demo,test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1800"):
        options.add_argument(argument)
    # an explicit driver path: Selenium Manager never looks for (or downloads) a driver
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app_url(browser):
    from maskdino_hf.webdemo import build_demo

    demo = build_demo()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        pytest.fail(f"timed out after {TIMEOUT} s waiting for {what}")


def _overlay(driver, previous: str | None = None) -> tuple[Image.Image, str]:
    """The decoded result image once it appears (and differs from ``previous``, the last one's address)."""
    from selenium.webdriver.common.by import By

    def source(d):
        images = d.find_elements(By.CSS_SELECTOR, "#overlay img")
        src = images[0].get_attribute("src") if images else None
        return src if src and src != previous else None

    src = _wait(driver, source, "the overlay image")
    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        with urllib.request.urlopen(src, timeout=TIMEOUT) as response:
            data = response.read()
    return Image.open(io.BytesIO(data)).convert("RGB"), src


def _table(driver, count: int) -> list[list[str]]:
    """The segment table's body rows (cell texts) once it shows ``count`` rows."""
    from selenium.webdriver.common.by import By

    def rows(d):  # Gradio's data grid: one [role=row] per body row, cells [role=gridcell]
        found = [
            [cell.text.strip() for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]
            for row in d.find_elements(By.CSS_SELECTOR, "#segments [role=grid] [role=row][data-index]")
        ]
        return found if len(found) == count and all(len(row) == 5 for row in found) else None

    return _wait(driver, rows, f"{count} rows in the segment table")


@functools.cache
def _bundled_model():
    return predict.load_model_and_processor(None)


def _expected(image: Image.Image, task: str, mask_threshold: float | None = None) -> list[dict]:
    """The rows of the CLI's predict path for ``image`` with the CLI's default threshold of ``task``."""
    model, processor = _bundled_model()
    threshold = predict.DEFAULT_INSTANCE_THRESHOLD if task in ("instance", "detection") else None
    predictor = predict.model_predict_fn(model, processor, [task], threshold=threshold, mask_threshold=mask_threshold)
    result = predictor([image])[0][task]
    return segment_table(result, model.config.id2label, task)


def test_upload_segment_and_read_the_overlay_and_table_in_a_browser(browser, app_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    start = time.monotonic()
    path = predict.demo_images()[0]
    image = predict.load_image(path)
    browser.get(app_url)
    upload = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"),
                   "the upload field")
    upload[0].send_keys(str(path))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"), "the uploaded image preview")
    checked = browser.find_element(By.CSS_SELECTOR, "#task input:checked").get_attribute("value")
    assert checked == "panoptic"  # the demo model is a panoptic model: the CLI's default task
    browser.find_element(By.CSS_SELECTOR, "#run").click()

    overlay, src = _overlay(browser)
    expected = _expected(image, "panoptic")
    assert expected, "the predict path found no segment"
    rows = _table(browser, len(expected))
    assert [row[1] for row in rows] == [row["label"] for row in expected]
    assert [int(row[0]) for row in rows] == [row["id"] for row in expected]
    assert [int(row[3]) for row in rows] == [row["area"] for row in expected]
    # the overlay is a real picture, larger than the input (enlarged, with a legend) and not the input itself
    pixels = np.asarray(overlay).astype(np.int64)
    assert overlay.width > image.width and overlay.height >= image.height
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100 and pixels.std() > 20
    shrunk = np.asarray(overlay.crop((0, 0, overlay.height * image.width // image.height, overlay.height))
                        .resize(image.size)).astype(np.int64)
    assert np.abs(shrunk - np.asarray(image).astype(np.int64)).mean() > 10
    summary = browser.find_element(By.CSS_SELECTOR, "#summary textarea").get_attribute("value")
    assert summary.startswith(f"panoptic: {len(expected)} segment")

    # another task: the threshold follows the task's CLI default and the table follows the task
    browser.find_element(By.CSS_SELECTOR, "#task input[value=instance]").click()
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
          .get_attribute("value") == str(predict.DEFAULT_INSTANCE_THRESHOLD), "the instance default threshold")
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    _, src = _overlay(browser, previous=src)
    expected = _expected(image, "instance")
    rows = _table(browser, len(expected))
    assert [(row[1], row[2]) for row in rows] == [(row["label"], f"{row['score']:.3f}") for row in expected]

    # back to panoptic with a lower mask threshold: the segments' areas are the predict path's at that threshold
    browser.find_element(By.CSS_SELECTOR, "#task input[value=panoptic]").click()
    field = browser.find_element(By.CSS_SELECTOR, "#mask-threshold input[type=number]")
    assert field.get_attribute("value") == str(predict.DEFAULT_MASK_THRESHOLD)
    field.clear()
    field.send_keys("0.35", Keys.TAB)
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#mask-threshold input[type=number]")
          .get_attribute("value") == "0.35", "the mask threshold 0.35")
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    _overlay(browser, previous=src)
    expected = _expected(image, "panoptic", mask_threshold=0.35)
    assert [row["area"] for row in expected] != [row["area"] for row in _expected(image, "panoptic")]
    rows = _table(browser, len(expected))
    assert [(row[1], int(row[3])) for row in rows] == [(row["label"], row["area"]) for row in expected]
    assert time.monotonic() - start < 90
