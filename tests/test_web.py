"""The web page end to end in headless Chromium (Selenium): type a query, the result grid shows
the collection's answer in order with its thumbnails drawn (checked in the DOM and in the
screenshot's pixels); upload an image, it finds itself; an image's page shows its caption, its
near-duplicate and answers a chat message, all equal to the library's."""

import io
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs Debian's chromium and chromium-driver (make installs them)", allow_module_level=True)

from PIL import Image  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from tests.serve_helpers import LiveServer, build_collection, image_folder, tiny_clip  # noqa: E402

import polymodal  # noqa: E402
from polymodal.index import Collection  # noqa: E402
from polymodal.serve import ServeConfig, Services, create_app  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tests.test_vlm import checkpoint

    root = tmp_path_factory.mktemp("web")
    model = tiny_clip(root / "clip")
    images = image_folder(root / "images")
    coll = Collection.open(build_collection(images, root / "db", model), model=str(model), readonly=True)
    _, _, d = checkpoint("opt", str(root / "vlm"))
    vlm = polymodal.load_vlm(d)
    s = Services(ServeConfig(), collection=coll, vlm=vlm)
    with LiveServer(create_app(s)) as live:
        yield {"url": live.url, "coll": coll, "vlm": vlm, "images": images, "root": root}
    s.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=30):
    # an alert the page has not raised yet is 'not yet', like a missing element
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=[NoAlertPresentException]).until(lambda d: condition(d))


def thumbnails_loaded(driver, selector):
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector)


def test_search_shows_the_results(site, browser):
    coll, query = site["coll"], "a red shape"
    browser.get(site["url"] + "/")
    box = browser.find_element(By.ID, "query")
    box.send_keys(query)
    browser.find_element(By.ID, "go").click()
    cards = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card.result"))
    wait(browser, lambda d: thumbnails_loaded(d, "#results img"))
    want = coll.search_text(query, k=24)
    assert [int(c.get_attribute("data-id")) for c in cards] == [h.id for h in want]
    assert browser.find_element(By.ID, "status").text == f"{len(want)} results"
    first_score = cards[0].find_element(By.CSS_SELECTOR, ".score").text
    assert first_score == f"{want[0].score:.3f}"

    # the screenshot: the grid is drawn, and the red shapes' pixels are in it (from the thumbnails)
    shot = Image.open(io.BytesIO(browser.find_element(By.ID, "results").screenshot_as_png)).convert("RGB")
    a = np.asarray(shot).astype(int)
    assert a.std() > 20  # not a blank area
    red = (a[..., 0] > 180) & (a[..., 1] < 80) & (a[..., 2] < 80)
    blue = (a[..., 2] > 180) & (a[..., 0] < 80) & (a[..., 1] < 120)
    assert red.sum() > 200 and blue.sum() > 200  # every colour of the collection is on screen
    shot.save(site["root"] / "results.png")


def test_upload_finds_the_image(site, browser):
    browser.get(site["url"] + "/")
    path = site["images"] / "green-2.png"
    browser.find_element(By.ID, "upload").send_keys(str(path))
    wait(browser, lambda d: d.find_element(By.ID, "status").text.endswith("results"))
    first = browser.find_element(By.CSS_SELECTOR, "#results .card.result")
    assert int(first.get_attribute("data-id")) == site["coll"].get(str(path)).id


def test_image_page_caption_duplicates_and_chat(site, browser):
    coll, vlm = site["coll"], site["vlm"]
    path = site["images"] / "red-0.png"
    item = coll.get(str(path)).id
    browser.get(f"{site['url']}/image/{item}")
    caption = vlm.caption(path)
    wait(browser, lambda d: d.find_element(By.ID, "caption").text == caption)
    duplicates = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#duplicates .card"))
    names = [c.find_element(By.CSS_SELECTOR, ".name").text for c in duplicates]
    assert names and names[0].startswith("copy.png")  # the near-copy is the nearest
    assert wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('image'); return i.complete && i.naturalWidth === 48;"))

    question = "what is in the picture"
    answer = vlm.ask(path, question, max_new_tokens=min(256, vlm.context_length // 2))
    assert answer
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.CSS_SELECTOR, "#chat-form button").click()
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#chat-log .user").text == question)
    reply = wait(browser, lambda d: d.execute_script(
        "const a = document.querySelector('#chat-log .assistant'); return a && a.textContent;"))
    wait(browser, lambda d: d.execute_script(
        "return document.querySelector('#chat-log .assistant').textContent;") == answer)
    assert reply


def test_the_page_asks_for_the_api_key(site, browser):
    """With --api-key the page asks once, then its searches and thumbnails carry the key."""
    s = Services(ServeConfig(api_key="open sesame"), collection=site["coll"])
    try:
        with LiveServer(create_app(s)) as live:
            browser.get(live.url + "/")
            browser.find_element(By.ID, "query").send_keys("a blue shape")
            browser.find_element(By.ID, "go").click()
            alert = wait(browser, lambda d: d.switch_to.alert)
            alert.send_keys("open sesame")
            alert.accept()
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card.result"))
            wait(browser, lambda d: thumbnails_loaded(d, "#results img"))
    finally:
        s.close()
