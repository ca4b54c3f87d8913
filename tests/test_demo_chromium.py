"""The web demo (`read_jax.demo`) driven in headless Chromium: upload an image, ask, get the mask back.

A tiny random READ is saved as a converted checkpoint and loaded the way `python -m read_jax.cli.demo` loads
one; the Gradio page is served on a free loopback port and Debian's `chromium` + `chromium-driver` drive it
through Selenium (nothing is downloaded at run time; `.ci/run` installs both under CI). The test uploads a
PNG, types a question, ticks "Always segment" (a random model does not emit [SEG] by itself), presses Ask, and
checks that the overlay the page shows is, pixel for pixel, the one `demo.respond_fn` computes in-process
and that it carries a non-empty mask. Skips where Chromium is not installed; FAILS when CI is set.

Set READ_JAX_DEMO_SCREENSHOT=path.png to keep a screenshot of the page with the mask.
"""

import base64
import io
import json
import os
import shutil
import socket
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from read_jax.inference import save_for_inference
from tests.helpers import require
from tests.protocol_fixtures import TOKENIZER, tiny_model

QUESTION = "Which region stands out? Please segment it."


def chromium_tools() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        msg = "Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg + ": .ci/run installs them")
        pytest.skip(msg)
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(path) -> np.ndarray:
    yy, xx = np.mgrid[0:240, 0:320]
    img = np.stack(
        [127 + 100 * np.sin(xx / 20.0), 127 + 100 * np.cos(yy / 30.0), 127 + 60 * np.sin((xx + yy) / 25.0)],
        -1,
    ).astype(np.uint8)
    Image.fromarray(img).save(path)
    return img


def _fetch_png(src: str) -> np.ndarray:
    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        with urllib.request.urlopen(src, timeout=30) as r:  # the page's own loopback server
            data = r.read()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("demo") / "tiny_release")
    save_for_inference(tiny_model(seed=1), ckpt, TOKENIZER)
    return ckpt


@pytest.fixture(scope="module")
def served(checkpoint):
    require("gradio")
    from read_jax import demo
    from read_jax.inference import load_for_inference

    model, tok = load_for_inference(checkpoint)  # as `python -m read_jax.cli.demo --checkpoint` does
    page = demo.build_demo(model, tok, max_new_tokens=32)
    port = _free_port()
    demo.serve(page, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/", demo.respond_fn(model, tok, max_new_tokens=32)
    page.close()


def test_demo_in_chromium_returns_a_mask(served, tmp_path):
    browser, driver_path = chromium_tools()
    webdriver = require("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, respond = served
    png = tmp_path / "upload.png"
    image = _image(png)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
    ):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 240)
        wait.until(
            EC.presence_of_element_located((By.CSS_SELECTOR, "#read-image input[type=file]"))
        ).send_keys(str(png))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#read-image img")))
        driver.find_element(By.CSS_SELECTOR, "#read-question textarea").send_keys(QUESTION)
        driver.find_element(By.CSS_SELECTOR, "#read-force input[type=checkbox]").click()
        driver.find_element(By.CSS_SELECTOR, "#read-ask").click()
        shown = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#read-overlay img")))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#read-similarity img")))
        answer = wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#read-answer textarea").get_attribute("value")
        )
        time.sleep(1.0)  # let the images finish painting before the screenshot
        shot = os.environ.get("READ_JAX_DEMO_SCREENSHOT") or str(tmp_path / "demo.png")
        driver.save_screenshot(shot)
        overlay = _fetch_png(shown.get_attribute("src"))
    finally:
        driver.quit()

    want_answer, want_overlay, _, info = respond(image, QUESTION, True)
    assert "[SEG]" in answer and answer == want_answer
    assert info["masks"] == 1 and info["mask_pixels"][0] > 0 and info["object_present"]
    assert overlay.shape == image.shape
    np.testing.assert_array_equal(overlay, want_overlay)  # the page shows the model's mask, pixel for pixel
    tinted = np.any(overlay != image, axis=-1).sum()
    assert tinted >= info["mask_pixels"][0]  # mask pixels (and the SasP point discs) differ from the upload


def test_demo_chat_loop_session(checkpoint, tmp_path, monkeypatch, capsys):
    """The interactive terminal chat (READ's demo.py loop): questions from stdin, `/image` switches the
    image, `/quit` ends; every answer gets an overlay and a record."""
    from read_jax.cli import chat

    first, second = tmp_path / "a.png", tmp_path / "b.png"
    _image(first)
    Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(second)
    lines = (
        f"what is here?\n\n/image {second}\n/image {tmp_path / 'missing.png'}\nand here?\n/quit\nnot asked\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    out = tmp_path / "chat"
    argv = ["--checkpoint", checkpoint, "--image", str(first), "--out", str(out), "--max-new-tokens", "8"]
    assert chat.main(argv) == 0
    printed = capsys.readouterr()
    records = json.loads((out / "answers.json").read_text())
    assert [r["question"] for r in records] == ["what is here?", "and here?"]
    assert [r["image"] for r in records] == [str(first), str(second)]
    assert all(os.path.isfile(r["overlay"]) for r in records)
    assert printed.out.count("Q: ") == 2 and "missing.png" in printed.err
