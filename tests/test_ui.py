"""`vectorsync ui` in a real browser (headless Chromium driven by Selenium) against a database with
tabular, image (bytea and files) and text embeddings: every page renders, thumbnails load, the
neighbours are the ones `vectorsync.nearest` returns, the map draws its points, a row whose text is
a script tag shows as text, and the browser console stays free of errors. Screenshots of each page
are saved under the test's temporary folder."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import explorer_data
from vectorsync.sync.spec import load_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

SPEC = """
[worker]
max_attempts = 1

[[embeddings]]
name = "wine"
table = "demo_wine"
key = "id"
modality = "tabular"
dim = 8
columns = {wine_columns}
encoder = {{ seed = 7 }}

[[embeddings]]
name = "digits"
table = "digits"
key = "id"
modality = "image"
dim = 16
distance = "l2"
column = "image"
image_size = 16
encoder = {{ seed = 0, epochs = 4 }}

[[embeddings]]
name = "photos"
table = "photos"
key = "id"
modality = "image"
dim = 8
path_column = "path"
base_dir = "."
image_size = 16
encoder = {{ seed = 0, epochs = 2 }}

[[embeddings]]
name = "articles"
table = "articles"
key = "id"
modality = "text"
dim = 32
column = "body"
encoder = {{ type = "lstm", seed = 0, epochs = 2 }}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def explorer(
    conn: psycopg.Connection, db_url: str, cli: Any, tmp_path: Path
) -> Iterator[tuple[str, psycopg.Connection]]:
    """The database, migrated, trained and synced, served by the UI on a free local port."""
    from vectorsync.sync.demo import load_wine_table
    from vectorsync.sync.ui.app import Settings, create_app

    explorer_data.load(conn, tmp_path)
    columns = load_wine_table(conn)
    config_path = tmp_path / "vectorsync.toml"
    config_path.write_text(SPEC.format(wine_columns=str(columns).replace("'", '"')))
    # a file outside base_dir, referenced by one more photo row: the UI must not serve it
    (tmp_path.parent / f"{tmp_path.name}-secret.png").write_bytes((tmp_path / "photos/digit_0.png").read_bytes())
    # one corrupt image: it fails, and Status must show it with its key, column and reason
    conn.execute("INSERT INTO digits VALUES (%s, 0, %s)", (explorer_data.DIGITS, b"\x89PNG broken"))
    for args in (["migrate"], ["train", "wine"]):
        result = cli(*args, config=config_path)
        assert result.code == 0, result.err
    result = cli("sync", config=config_path)
    assert result.code == 1 and "failed" in result.err, result.err  # the corrupt image only
    conn.execute("INSERT INTO photos VALUES (999, %s)", (f"../{tmp_path.name}-secret.png",))
    with serving(create_app(Settings(db_url, load_config(config_path)))) as base:
        yield base, conn


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free local port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the UI did not start within 60 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def browser() -> Iterator[Any]:
    yield from chromium()


def chromium() -> Iterator[Any]:
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip(
            "no headless Chromium: install Debian's chromium and chromium-driver (the README's test command "
            "does so when run as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


class Pages:
    """Opens pages, saves a screenshot of each, and collects console errors along the way."""

    def __init__(self, driver: Any, base: str, shots: Path) -> None:
        self.driver, self.base, self.shots = driver, base, shots
        self.errors: list[dict[str, Any]] = []
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, path: str, shot: str, ready: str | None = None) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get(self.base + path)
        if ready:
            WebDriverWait(self.driver, 120).until(lambda d: d.execute_script(ready))
        self.driver.save_screenshot(str(self.shots / f"{shot}.png"))
        self.collect()
        return self.driver.find_element(By.TAG_NAME, "body")

    def collect(self) -> None:
        self.errors += [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def cards(self) -> list[str]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#neighbours .card')].map(c => c.dataset.key)"
        )

    def thumbnails_loaded(self) -> list[int]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('img.thumb')].map(i => i.complete ? i.naturalWidth : -1)"
        )


def nearest(conn: psycopg.Connection, name: str, key: str, k: int = 10) -> list[str]:
    return [r[0] for r in conn.execute("SELECT key FROM vectorsync.nearest(%s, %s, %s)", (name, key, k))]


IMAGES_READY = "return [...document.querySelectorAll('img.thumb')].every(i => i.complete)"


def test_every_page_in_a_real_browser(explorer, browser, tmp_path):
    base, conn = explorer
    check_pages(base, conn, browser, tmp_path / "screenshots")


def check_pages(base: str, conn: psycopg.Connection, browser: Any, shots: Path) -> None:
    pages = Pages(browser, base, shots)

    main = pages.open("/", "status", "return document.querySelectorAll('#embeddings tbody tr').length == 4")
    rows = {r.get_attribute("data-name"): r.text for r in main.find_elements("css selector", "#embeddings tbody tr")}
    assert set(rows) == {"wine", "digits", "photos", "articles"}
    assert rows["digits"].split()[1:3] == [str(explorer_data.DIGITS + 1), str(explorer_data.DIGITS)]
    failed = main.find_element("id", "failed").text
    assert f"digits {explorer_data.DIGITS} image" in failed and "image" in failed.split("\n")[1]
    assert not main.find_elements("css selector", "form[action^='/retry']")  # read-only: no retry button

    for name, key in (("digits", "7"), ("photos", "3"), ("wine", "0"), ("articles", "5")):
        pages.open(f"/explore?embedding={name}&key={key}&k=10", f"explore-{name}", IMAGES_READY)
        assert pages.cards() == nearest(conn, name, key), name
        if name in ("digits", "photos"):
            widths = pages.thumbnails_loaded()
            assert len(widths) == 11 and min(widths) > 0, (name, widths)

    main = pages.open("/explore?embedding=digits&key=123456", "explore-missing-row")
    assert "has no row with id = 123456" in main.find_element("id", "error").text and not pages.cards()

    # the XSS row: its text is on the page, as text; the script never ran
    main = pages.open("/explore?embedding=articles&key=0", "explore-xss")
    assert "<script>window.__vectorsync_xss = 1</script>" in main.find_element("css selector", ".card.query").text
    assert browser.execute_script("return window.__vectorsync_xss === undefined")
    assert not browser.find_elements("css selector", "main script")  # the only scripts are the page's own

    # a free-text search encodes the words with the embedding's model
    pages.open("/explore?embedding=articles&q=the+striker+scored+a+goal", "explore-text-search")
    assert len(pages.cards()) == 10

    # clicking a card searches from it
    first = pages.cards()[0]
    browser.find_element("css selector", f"#neighbours .card[data-key='{first}']").click()
    assert f"key={first}" in browser.current_url and pages.cards() == nearest(conn, "articles", first)

    pages.open(
        "/map?embedding=digits&color=label",
        "map",
        "const m = document.getElementById('map'); return m.dataset.points && m.querySelectorAll('.point').length",
    )
    drawn = browser.execute_script("return document.querySelectorAll('#map .scatterlayer .point').length")
    assert drawn == explorer_data.DIGITS
    legend = browser.execute_script(
        "return [...document.querySelectorAll('#map .legend .traces')].map(t => t.textContent)"
    )
    assert legend == [str(d) for d in range(10)]  # coloured by the ten digit labels
    # hovering a point shows its key and thumbnail; clicking it opens it in Explore
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    point = browser.find_elements("css selector", "#map .scatterlayer .point")[0]
    ActionChains(browser).move_to_element(point).perform()
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "const i = document.getElementById('hover-thumb'); return i.complete && i.naturalWidth"
        )
    )
    hovered = browser.find_element("id", "hover-key").text.removeprefix("key ")
    browser.save_screenshot(str(shots / "map-hover.png"))
    ActionChains(browser).move_to_element(point).click().perform()
    WebDriverWait(browser, 30).until(lambda d: "/explore" in d.current_url)
    assert f"key={hovered}" in browser.current_url and pages.cards() == nearest(conn, "digits", hovered)

    pages.open("/models?embedding=wine", "models", "return document.getElementById('curves').dataset.curves")
    assert browser.execute_script("return document.querySelectorAll('#curves .scatterlayer .trace').length") == 1
    assert "holdout_reconstruction_mse" in browser.find_element("id", "versions").text

    main = pages.open("/report/wine?label=cultivar", "report")
    assert "baseline" in browser.find_element("id", "verdict").text

    pages.collect()
    assert pages.errors == [], pages.errors
    assert len(list(pages.shots.glob("*.png"))) == 12
    print(f"screenshots: {pages.shots}")

    # safety: no writes, no file outside base_dir
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{base}/retry/digits", method="POST"))
    assert refused.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as outside:
        urllib.request.urlopen(f"{base}/thumb/photos/999")
    assert outside.value.code == 404 and b"outside base_dir" in outside.value.read()


def test_retry_button_only_with_allow_retry(explorer, db_url, tmp_path):
    from vectorsync.sync.ui.app import Settings, create_app

    _, conn = explorer
    config = load_config(tmp_path / "vectorsync.toml")
    assert conn.execute("SELECT key FROM vectorsync.failed").fetchall() == [(str(explorer_data.DIGITS),)]
    with serving(create_app(Settings(db_url, config, allow_retry=True))) as base:
        with urllib.request.urlopen(base + "/") as response:
            assert 'action="/retry/digits"' in response.read().decode()
        request = urllib.request.Request(f"{base}/retry/digits", method="POST")
        with urllib.request.urlopen(request) as response:  # redirected back to Status
            assert response.status == 200
    assert conn.execute("SELECT count(*) FROM vectorsync.failed").fetchone()[0] == 0
    queued = conn.execute("SELECT key FROM vectorsync.pending WHERE embedding = 'digits'").fetchall()
    assert (str(explorer_data.DIGITS),) in queued


def test_binding_beyond_loopback_needs_the_explicit_flag_and_a_token():
    from vectorsync.sync.spec import SpecError
    from vectorsync.sync.ui.server import plan

    assert plan("127.0.0.1", 8765, allow_remote=False, token=None) == ("http://127.0.0.1:8765/", None)
    with pytest.raises(SpecError, match="--allow-remote"):
        plan("0.0.0.0", 8765, allow_remote=False, token=None)
    url, token = plan("0.0.0.0", 8765, allow_remote=True, token=None)
    assert token and len(token) >= 24 and url.endswith(f"?token={token}")
    assert plan("0.0.0.0", 1, allow_remote=True, token="s3cret")[1] == "s3cret"


def test_with_a_token_every_request_needs_it(db_url):
    from vectorsync.sync.spec import Config
    from vectorsync.sync.ui.app import Settings, create_app

    with serving(create_app(Settings(db_url, Config(), token="s3cret-token"))) as base:
        for path in ("/", "/static/app.js", "/vendor/plotly.min.js", "/api/status"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path)
            assert refused.value.code == 401, path
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/?token=wrong")
        with urllib.request.urlopen(base + "/?token=s3cret-token") as response:
            assert "vectorsync migrate" in response.read().decode()  # the page, on an empty database
            cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        request = urllib.request.Request(base + "/api/status", headers={"Cookie": cookie.split(";")[0]})
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
