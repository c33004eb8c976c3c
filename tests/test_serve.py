"""`avpgan serve`: the page's faces are generate.py's, bad input gets a message on the page, and
the page works in a real browser (Debian's headless chromium driven by Selenium): uploads, a
grid of several voices, a recording from the browser's microphone, an upload that is too large.

The browser tests skip where chromium or chromedriver is missing (a developer without root);
`make test` installs both.
"""

from __future__ import annotations

import base64
import io
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import subprocess_env
from test_evaluate import tiny_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_UPLOAD_MB = 1  # the test server's limit: the voices fit, too_large.wav does not


@pytest.fixture(scope="module")
def model(tiny_shards, tmp_path_factory) -> Path:
    """The tiny test bundle, its generator's batch-norm statistics measured on what it draws.

    Three training steps leave those statistics at their init (mean 0, variance 1) while the
    DCGAN-initialised layers' activations are ~1e-4, so the generator draws one flat grey; a test
    of what the page shows needs faces whose pixels differ. The bundle is exported from a copy of
    the run, as `avpgan export` makes any bundle.
    """
    from avpgan import bundle
    from avpgan.train.stages import write_weights

    src = tiny_model(tiny_shards, tmp_path_factory)
    run = tmp_path_factory.mktemp("serve-run")
    shutil.copy(src / "config.yaml", run)
    for stage in ("voice", "embedder", "gan", "restore"):
        (run / stage).mkdir()
        shutil.copy(src / stage / "model.safetensors", run / stage)
    g = bundle.load(src / "model.safetensors").generator
    for norm in g.norms:
        norm.reset_running_stats()
        norm.momentum = None  # the plain mean over the batch below
    with torch.no_grad():
        g.train()(F.normalize(torch.randn(256, g.embed_dim, generator=torch.Generator().manual_seed(0)), dim=1))
    write_weights(g.eval(), run / "gan" / "model.safetensors")
    bundle.export(run, run / "model.safetensors")
    return run / "model.safetensors"


@pytest.fixture(scope="module")
def voices(synthvox_dir, tmp_path_factory) -> dict[str, Path]:
    """Two speakers' voices as users hand them over, and files that cannot give a face."""
    wavs = sorted((synthvox_dir / "voxceleb1" / "wav").glob("*/*/*.wav"))
    first, other = wavs[0], next(w for w in wavs if w.parts[-3] != wavs[0].parts[-3])
    y, sr = sf.read(first, dtype="float32")
    d = tmp_path_factory.mktemp("serve-voices")
    files = {name: d / name for name in ("speaker-a.wav", "speaker-b.flac", "notes.wav", "click.wav",
                                         "too_large.wav")}
    shutil.copy(first, files["speaker-a.wav"])
    y2, sr2 = sf.read(other, dtype="float32")
    sf.write(files["speaker-b.flac"], y2, sr2)
    files["notes.wav"].write_text("not a recording\n")
    sf.write(files["click.wav"], np.r_[np.zeros(sr // 2), y[sr : sr + sr // 20], np.zeros(sr // 2)], sr)
    noise = np.random.default_rng(0).normal(0, 0.1, 40 * sr)  # 40 s of 16 kHz PCM_16: 1.2 MB
    sf.write(files["too_large.wav"], noise, sr, subtype="PCM_16")
    assert sum(files[n].stat().st_size for n in ("speaker-a.wav", "speaker-b.flac")) < MAX_UPLOAD_MB * 2**20
    return files


def decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def assert_a_face(image: np.ndarray, size: int) -> None:
    """The network's size, and not one flat colour (an all-black or all-grey image is no face)."""
    assert image.shape == (size, size, 3)
    assert image.std() > 5 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50


# ----------------------------------------------------------------------------------------------
# In-process: Starlette's test client, no browser.


@pytest.fixture(scope="module")
def client(model):
    from starlette.testclient import TestClient

    from avpgan.serve import create_app

    return TestClient(create_app(model, max_upload_mb=MAX_UPLOAD_MB, max_files=4, log=lambda line: None))


def post(client, *paths: Path, names: list[str] | None = None):
    names = names or [p.name for p in paths]
    return client.post("/", files=[("voices", (n, p.read_bytes())) for n, p in zip(names, paths)])


def test_the_page_offers_upload_and_recording_and_names_the_clip_length(client):
    r = client.get("/")
    assert r.status_code == 200
    assert re.search(r'<input type="file" id="files" name="voices" multiple', r.text)
    assert 'id="record"' in r.text and "MediaRecorder" in r.text
    assert "faces from 4 s clips of voice, and their" in r.text  # tiny.yaml's crop; the bundle restores


def test_faces_are_generate_pys_and_bad_files_say_why(client, model, voices, tmp_path):
    from avpgan.generate import generate

    r = post(client, voices["speaker-a.wav"], voices["notes.wav"], voices["click.wav"], voices["speaker-b.flac"])
    assert r.status_code == 200
    cards = r.text.split('<section class="card">')[1:]
    assert [re.search(r"<h2>(.*?)</h2>", c).group(1) for c in cards] == \
        ["speaker-a.wav", "notes.wav", "click.wav", "speaker-b.flac"]
    assert "2 of 4 files gave a face" in r.text
    assert "cannot decode audio" in cards[1] and "avpgan-serve-" not in cards[1]  # the upload, not the temp file
    assert "of voice after silence removal" in cards[2]
    faces = [[decode(u) for u in re.findall(r'<img class="generated" src="([^"]+)"', c)] for c in cards]
    restored = [[decode(u) for u in re.findall(r'<img class="restored" src="([^"]+)"', c)] for c in cards]
    assert [len(f) for f in faces] == [1, 0, 0, 1] and [len(f) for f in restored] == [1, 0, 0, 1]
    for face in faces[0] + faces[3] + restored[0] + restored[3]:
        assert_a_face(face, 64)
    assert np.abs(faces[0][0].astype(int) - faces[3][0].astype(int)).mean() > 1, "two voices, one face"
    assert re.search(r"\d+\.\d s of voice: the mean of \d+ clips of 4 s", cards[0])

    # the face `avpgan generate` writes for the same file
    generate(model, [voices["speaker-a.wav"]], tmp_path, restore=False, log=lambda line: None)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "speaker-a_64.png")), faces[0][0])


def test_file_names_are_shown_as_text(client, voices):
    r = post(client, voices["notes.wav"], names=["<img src=x onerror=alert(1)>.wav"])
    assert "<img src=x" not in r.text and "&lt;img src=x onerror=alert(1)&gt;.wav" in r.text


@pytest.mark.parametrize("case, status, message", [
    ("too large", 413, "The upload is too large: 1.2 MB; this server takes up to 1 MB"),
    ("no file", 400, "Choose one or more recordings first"),
    ("too many files", 400, "Too many files"),
])
def test_unusable_uploads_get_a_message_on_the_page(client, voices, case, status, message):
    if case == "too large":
        r = post(client, voices["too_large.wav"])
    elif case == "no file":
        r = client.post("/", files=[("voices", ("", b""))])
    else:
        r = post(client, *[voices["click.wav"]] * 5)  # the test client takes 4
    assert r.status_code == status
    assert re.search(r'<p class="error" id="error">(.*?)</p>', r.text).group(1).startswith(message)
    assert 'id="files"' in r.text  # the form is still there to try again


# ----------------------------------------------------------------------------------------------
# A real browser against `avpgan serve` in its own process.


@pytest.fixture(scope="module")
def server(model):
    """`avpgan serve MODEL --port 0` in a subprocess; its first line says the port it got."""
    p = subprocess.Popen([sys.executable, "-m", "avpgan", "serve", str(model), "--port", "0",
                          "--max-upload-mb", str(MAX_UPLOAD_MB)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()
    seen = []
    try:
        while not (m := re.search(r"http://\S+", seen[-1] if seen else "")):
            seen.append(lines.get(timeout=120))
        yield m.group(0)
    except queue.Empty:
        pytest.fail("avpgan serve printed no address:\n" + "".join(seen))
    finally:
        p.terminate()
        p.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(voices, tmp_path_factory):
    """Headless chromium whose microphone plays speaker-a.wav (Chromium's fake capture device)."""
    missing = [f for f in (CHROMIUM, CHROMEDRIVER) if not os.access(f, os.X_OK)]
    if missing:
        pytest.skip(f"no {' or '.join(missing)}: install Debian's chromium and chromium-driver (make test does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={voices['speaker-a.wav']}"):
        options.add_argument(arg)
    # The driver's path is given, so Selenium Manager is not asked for one; were it asked, SE_OFFLINE
    # keeps it from downloading a driver or a browser.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def results(driver, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.ID, "results") or d.find_elements(By.ID, "error"))
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def shown_faces(driver, card) -> list[np.ndarray]:
    """Each face the browser decoded and laid out in this card, checked at its natural size."""
    from selenium.webdriver.common.by import By

    faces = []
    for img in card.find_elements(By.TAG_NAME, "img"):
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 64
        assert img.size["width"] > 64  # laid out larger than its pixels
        faces.append(decode(img.get_attribute("src")))
    return faces


@pytest.mark.slow
def test_uploads_in_the_browser_give_a_grid_of_faces(browser, server, voices):
    from selenium.webdriver.common.by import By

    browser.get(server)
    chosen = [voices["speaker-a.wav"], voices["speaker-b.flac"], voices["notes.wav"]]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in chosen))
    browser.find_element(By.ID, "make").click()
    cards = results(browser)
    assert [c.find_element(By.TAG_NAME, "h2").text for c in cards] == [p.name for p in chosen]
    for card in cards[:2]:
        faces = shown_faces(browser, card)
        assert len(faces) == 2  # generated and restored
        for face in faces:
            assert_a_face(face, 64)
        assert re.search(r"\d\.\d s of voice.* 4 s", card.find_element(By.CLASS_NAME, "clip").text)
    assert "cannot decode audio" in cards[2].find_element(By.CLASS_NAME, "problem").text
    if os.environ.get("AVPGAN_SERVE_SCREENSHOT"):  # docs/figures/serve.png is made this way
        browser.find_element(By.TAG_NAME, "body").screenshot(os.environ["AVPGAN_SERVE_SCREENSHOT"])


@pytest.mark.slow
def test_a_recording_in_the_browser_gives_a_face(browser, server):
    """Record with MediaRecorder from the fake microphone, then decode and upload as WAV."""
    import time

    from selenium.webdriver.common.by import By

    browser.get(server)
    record = browser.find_element(By.ID, "record")
    record.click()
    time.sleep(2.0)
    record.click()  # Stop: the page decodes the recording and submits it
    cards = results(browser)
    assert [c.find_element(By.TAG_NAME, "h2").text for c in cards] == ["recording.wav"]
    for face in shown_faces(browser, cards[0]):
        assert_a_face(face, 64)


@pytest.mark.slow
def test_an_upload_too_large_says_so_in_the_browser(browser, server, voices):
    from selenium.webdriver.common.by import By

    browser.get(server)
    browser.find_element(By.ID, "files").send_keys(str(voices["too_large.wav"]))
    browser.find_element(By.ID, "make").click()
    assert results(browser) == []
    assert "too large" in browser.find_element(By.ID, "error").text
