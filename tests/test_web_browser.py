"""The web page in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
Selenium), against `metaql serve` started as a process on a demo store. Marker `browser`: run by
.ci/run as its own step (python -m pytest -m browser). A missing browser FAILS these tests.

Screenshots of every page go to a temp dir (printed); METAQL_SCREENSHOT_DOCS=1 also refreshes
docs/web-review.png, the one in the README."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WHO = "tester"
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from metaql.demo import run
    path = str(tmp_path_factory.mktemp("browser") / "demo.mq")
    run(path, epochs=3, checkpoints=(2, 3), out=io.StringIO(), progress=False)
    return path


@pytest.fixture(scope="module")
def server(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "metaql.cli", "serve", store, "--port", str(port),
                             "--user", WHO], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"metaql serve exited: {proc.stdout.read()}")
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("metaql serve did not start listening within 60 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"the browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} "
                    "not found): apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser tests need selenium: pip install -e '.[web,browser-test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots in {d}")
    return d


def wait(driver, condition, seconds: float = 60, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d),
                                                                    message=f"waiting for {what}")


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(driver).send_keys(key).perform()


def images_loaded(driver) -> bool:
    return driver.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")


def test_query_page(browser, server, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    browser.get(server + "/query")
    box = browser.find_element(By.ID, "q")
    box.send_keys("SELECT TOPK(40) train FROM SELF_INFLUENCE(layers=*) ORDER BY DESC")
    box.send_keys(Keys.CONTROL, Keys.ENTER)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#result tbody tr"), what="the result table")
    rows = browser.find_elements(By.CSS_SELECTOR, "#result tbody tr")
    assert len(rows) == 25 and "40 row(s)" in browser.page_source
    browser.find_element(By.LINK_TEXT, "score").click()          # sort by score, descending
    wait(browser, lambda d: "score ▼" in d.page_source, what="the sorted table")
    scores = [float(r.find_elements(By.TAG_NAME, "td")[-1].text)
              for r in browser.find_elements(By.CSS_SELECTOR, "#result tbody tr")]
    assert scores == sorted(scores, reverse=True)
    wait(browser, images_loaded, what="thumbnails and the histogram")
    browser.save_screenshot(str(shots / "query.png"))
    assert console_errors(browser) == []


def test_review_by_keyboard_undo_and_reload(browser, server, store, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    import metaql
    browser.get(server + "/review?k=12")
    cards = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#review-grid .card"), what="the grid")
    wait(browser, lambda d: not d.find_elements(By.XPATH, "//*[contains(@class,'influential') and "
                                                          "contains(., '…')]"), what="influential samples")
    assert len(cards) == 12
    ids = [int(c.get_attribute("data-sample")) for c in cards[:3]]
    given = [int(c.get_attribute("data-given")) for c in cards[:3]]
    keys = [str((given[0] + 1) % 10), "c", str((given[2] + 2) % 10)]
    for card, key in zip(cards[:3], keys):
        assert "selected" in card.get_attribute("class")
        press(browser, key)
        wait(browser, lambda d, c=card: c.get_attribute("data-decided") != "", what=f"the decision {key}")
    assert "2/3 = 0.667" in browser.find_element(By.ID, "precision").text
    press(browser, "u")
    wait(browser, lambda d: cards[2].get_attribute("data-decided") == "", what="the undo")
    browser.refresh()
    cards = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#review-grid .card"), what="the grid")
    decided = {int(c.get_attribute("data-sample")): c.get_attribute("data-decided") for c in cards}
    assert decided[ids[0]] == keys[0] and decided[ids[1]] == str(given[1]) and decided[ids[2]] == ""
    assert "1/2 = 0.500" in browser.find_element(By.ID, "precision").text
    selected = lambda: [i for i, c in enumerate(cards) if "selected" in c.get_attribute("class")]  # noqa: E731
    assert selected() == [2]                                     # the first undecided card
    press(browser, Keys.ARROW_RIGHT)
    assert selected() == [3]
    per_row = browser.execute_script("const c = document.querySelectorAll('.card'); "
                                     "return Array.from(c).filter(x => x.offsetTop === c[0].offsetTop).length")
    press(browser, Keys.ARROW_DOWN)                              # one row further
    assert selected() == [3 + per_row]
    wait(browser, lambda d: not d.find_elements(By.XPATH, "//*[contains(@class,'influential') and "
                                                          "contains(., '…')]"), what="influential samples")
    wait(browser, images_loaded, what="thumbnails")
    browser.save_screenshot(str(shots / "review.png"))
    if os.environ.get("METAQL_SCREENSHOT_DOCS"):
        DOCS.mkdir(exist_ok=True)
        browser.save_screenshot(str(DOCS / "web-review.png"))
    assert console_errors(browser) == []
    con = metaql.connect(store, read_only=True)
    rows = con.execute("SELECT sample_id, label, labeled_by FROM labels ORDER BY labeled_at").fetchall()
    assert rows == [(ids[0], int(keys[0]), WHO), (ids[1], given[1], WHO)]
    notes = con.execute("SELECT sample_id, label FROM annotations ORDER BY annotated_at").fetchall()
    assert notes == [(ids[0], int(keys[0])), (ids[1], given[1])]
    con.close()


def test_lancet_round_from_the_page(browser, server, store, shots):
    from selenium.webdriver.common.by import By
    import metaql
    browser.get(server + "/session")
    browser.find_element(By.ID, "pool-name").clear()
    browser.find_element(By.ID, "pool-name").send_keys("to_label")
    from selenium.webdriver.support.ui import Select
    Select(browser.find_element(By.ID, "pool-split")).select_by_visible_text("test")
    browser.find_element(By.ID, "make-pool").click()
    wait(browser, lambda d: d.find_elements(By.ID, "run-round"), what="the session page")
    assert console_errors(browser) == []
    steps = browser.find_element(By.NAME, "steps")
    steps.clear()
    steps.send_keys("100")
    browser.find_element(By.ID, "run-round").click()             # round 1: a random start
    cards = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#session-grid .card"), what="candidates")
    con = metaql.connect(store, read_only=True)
    truth = dict(con.execute("SELECT sample_id, true_label FROM samples").fetchall())
    con.close()
    for card in cards:                                           # label each by its number key
        press(browser, str(truth[int(card.get_attribute("data-sample"))]))
        wait(browser, lambda d, c=card: c.get_attribute("data-decided") != "", what="a label")
    browser.find_element(By.ID, "run-round").click()             # round 2: LANCET trains
    wait(browser, lambda d: d.find_elements(By.ID, "accuracy"), seconds=300, what="the trained round")
    assert browser.find_element(By.NAME, "steps").get_attribute("value") == "100"   # settings kept
    assert "stop rule:" in browser.find_element(By.ID, "stop-rule").text
    accuracy = float(browser.find_element(By.ID, "accuracy").text)
    assert 0 <= accuracy <= 1
    wait(browser, images_loaded, what="the curve and thumbnails")
    browser.save_screenshot(str(shots / "session.png"))
    if os.environ.get("METAQL_SCREENSHOT_DOCS"):
        browser.save_screenshot(str(DOCS / "web-session.png"))
    assert console_errors(browser) == []
    con = metaql.connect(store, read_only=True)
    n = con.execute("SELECT count(*) FROM labels WHERE labeled_by = ? AND sample_id IN "
                    "(SELECT sample_id FROM set_members WHERE set_name = 'to_label')", [WHO]).fetchone()[0]
    con.close()
    assert n == len(cards)
    # the round is kept in the store: its curve's point is the page's accuracy
    from metaql import plot
    con = metaql.connect(store, read_only=True)
    line = plot.lancet_curve(con, "to_label").axes[0].lines[0]
    con.close()
    assert line.get_ydata().tolist() == pytest.approx([accuracy], abs=5e-4)
    assert line.get_xdata().tolist() == [n]


# Records, across the page's reload, that the progress bar was shown and what it said (the
# candidates of a small pool may come before a poll of the test would see the bar).
WATCH_PROGRESS = """
const bar = document.getElementById("progress"), text = document.getElementById("progress-text");
sessionStorage.setItem("shown", "0"); sessionStorage.setItem("texts", "[]");
new MutationObserver(() => { if (!bar.hidden) sessionStorage.setItem("shown", "1"); })
  .observe(bar, {attributes: true});
new MutationObserver(() => {
  const seen = JSON.parse(sessionStorage.getItem("texts"));
  seen.push(text.textContent);
  sessionStorage.setItem("texts", JSON.stringify(seen));
}).observe(text, {childList: true, characterData: true, subtree: true});
"""


def test_active_learning_page(browser, server, store, shots):
    """An active-learning session from the page: Next candidates runs as a job (its progress bar
    shown, counting the scoring's batches), a number key labels the selected candidate, and the
    status row counts it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    import metaql
    browser.get(server + "/session")
    browser.find_element(By.ID, "pool-name").clear()
    browser.find_element(By.ID, "pool-name").send_keys("al_pool")
    Select(browser.find_element(By.ID, "pool-split")).select_by_visible_text("test")
    Select(browser.find_element(By.ID, "pool-method")).select_by_value("active")
    browser.find_element(By.ID, "make-pool").click()
    wait(browser, lambda d: d.find_elements(By.ID, "get-candidates"), what="the active-learning page")
    k = browser.find_element(By.NAME, "k")
    k.clear()
    k.send_keys("6")
    browser.execute_script(WATCH_PROGRESS)
    browser.find_element(By.ID, "get-candidates").click()
    cards = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#method-grid .card"), what="candidates")
    assert len(cards) == 6
    assert browser.execute_script("return sessionStorage.getItem('shown')") == "1"
    texts = browser.execute_script("return JSON.parse(sessionStorage.getItem('texts'))")
    assert any(t.startswith("done: gradient norms") for t in texts), texts
    cell = lambda key: browser.find_element(By.CSS_SELECTOR, f'#status-row td[data-key="{key}"]').text  # noqa: E731
    before = {key: int(cell(key)) for key in ("cycles", "n_labeled", "pending")}
    assert before["cycles"] >= 1 and before["pending"] == 6
    card = cards[0]
    assert "selected" in card.get_attribute("class")
    press(browser, "7")
    wait(browser, lambda d: card.get_attribute("data-decided") == "7", what="the label")
    wait(browser, lambda d: int(cell("pending")) == 5, what="the status row")
    assert int(cell("n_labeled")) == before["n_labeled"] + 1 and int(cell("cycles")) == before["cycles"]
    assert "labeled 7" in browser.find_element(By.ID, "status").text
    wait(browser, images_loaded, what="thumbnails")
    browser.save_screenshot(str(shots / "active.png"))
    if os.environ.get("METAQL_SCREENSHOT_DOCS"):
        browser.save_screenshot(str(DOCS / "web-active.png"))
    assert console_errors(browser) == []
    con = metaql.connect(store, read_only=True)
    row = con.execute("SELECT label, labeled_by FROM labels WHERE sample_id = ?",
                      [int(card.get_attribute("data-sample"))]).fetchone()
    con.close()
    assert row == (7, WHO)


def test_label_cleaning_page(browser, server, store, shots):
    """A label-cleaning session from the page: Next candidates begins it (a job: its progress bar
    counts the forward passes' batches), a number key appends an annotation, the status row
    counts it as spent."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    import metaql
    browser.get(server + "/session")
    browser.find_element(By.ID, "pool-name").clear()
    browser.find_element(By.ID, "pool-name").send_keys("lc_pool")
    Select(browser.find_element(By.ID, "pool-split")).select_by_visible_text("test")
    Select(browser.find_element(By.ID, "pool-method")).select_by_value("cleaning")
    browser.find_element(By.ID, "make-pool").click()
    wait(browser, lambda d: d.find_elements(By.ID, "status-note"), what="the label-cleaning page")
    for name, value in (("k", "4"), ("budget", "20"), ("update_every", "5")):
        field = browser.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    browser.execute_script(WATCH_PROGRESS)
    browser.find_element(By.ID, "get-candidates").click()
    cards = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#method-grid .card"), what="candidates")
    assert len(cards) == 4 and browser.execute_script("return sessionStorage.getItem('shown')") == "1"
    texts = browser.execute_script("return JSON.parse(sessionStorage.getItem('texts'))")
    assert any(t.startswith("done: predictions") for t in texts), texts
    cell = lambda key: int(browser.find_element(By.CSS_SELECTOR, f'#status-row td[data-key="{key}"]').text)  # noqa: E731
    assert (cell("spent"), cell("budget_left")) == (0, 20)
    card = cards[0]
    count = int(card.find_element(By.CLASS_NAME, "n-annotations").text)
    press(browser, "3")
    wait(browser, lambda d: int(card.find_element(By.CLASS_NAME, "n-annotations").text) == count + 1,
         what="the annotation")
    wait(browser, lambda d: cell("spent") == 1, what="the status row")
    assert cell("budget_left") == 19
    assert console_errors(browser) == []
    browser.save_screenshot(str(shots / "cleaning.png"))
    con = metaql.connect(store, read_only=True)
    rows = con.execute("SELECT label, annotated_by FROM annotations WHERE sample_id = ?",
                       [int(card.get_attribute("data-sample"))]).fetchall()
    con.close()
    assert rows[-1] == (3, WHO) and len(rows) == count + 1


def test_every_page_loads_without_console_errors(browser, server, shots):
    for name in ("query", "review", "session"):
        browser.get(f"{server}/{name}")
        wait(browser, lambda d: d.execute_script("return document.readyState") == "complete")
        time.sleep(0.5)       # the review page's influential samples arrive after the load event
        browser.save_screenshot(str(shots / f"{name}-plain.png"))
        assert console_errors(browser) == [], name
