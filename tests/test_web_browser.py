"""The dashboard in a real headless browser (Debian's chromium, driven by Selenium through
/usr/bin/chromedriver) against a real cluster of processes: the overview shows the node, a
task's page shows its output arriving live, kill through the page (sign-in with the broker
account, confirmation) ends it ``killed``, and the tasks table filters by state from the URL.

Screenshots of every page go to ``test-artifacts/browser/`` (git-ignored) so a failure can
be looked at; the README's task-page picture is one of them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from harness.local_cluster import Cluster

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
TICKER = 'for i in $(seq 0 599); do echo "tick $i"; sleep 1; done'

pytestmark = pytest.mark.skipif(not (Path(CHROMEDRIVER).exists() and Path(CHROMIUM).exists()),
                                reason="needs Debian's chromium and chromium-driver (.ci/ensure-services.sh)")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def web_cluster(tmp_path):
    # The task's owner is the submitting Unix user; the broker account "guest" acts as an admin.
    cluster = Cluster(tmp_path / "cluster", ["node1"], security={"admins": ["guest"]})
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_dashboard_in_a_real_browser(web_cluster, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    url = web_cluster.web_url
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)

    started = time.monotonic()

    def shot(name: str) -> None:
        print(f"{time.monotonic() - started:6.1f} s  screenshot {name}")
        browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def text(selector: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, selector).text

    try:
        # The overview shows the node online.
        browser.get(url + "/")
        wait.until(lambda b: "online" in text('#overview-nodes tr[data-node="node1"]'))
        assert text("#nodes-online") == "1"
        shot("overview")

        # A task from the CLI that prints a line a second: its page shows lines arriving.
        task_id = web_cluster.cli_ok("--target", "node1", "--", "sh", "-c", TICKER).strip()
        web_cluster.wait_state(task_id, "running")
        browser.get(f"{url}/tasks/{task_id}")
        assert text("#task-id") == task_id
        browser.execute_script("window.sameDocument = true")   # gone if the page reloaded
        wait.until(lambda b: "tick 0" in text("#stdout"))
        seen = text("#stdout").count("tick")
        wait.until(lambda b: text("#stdout").count("tick") >= seen + 2)
        assert browser.execute_script("return window.sameDocument") is True
        lines = text("#stdout").splitlines()
        assert lines == [f"tick {i}" for i in range(len(lines))]    # in order, nothing twice
        shot("task-page")

        # Kill through the page: not signed in, the confirmation refuses and offers sign-in.
        browser.find_element(By.ID, "action-kill").click()
        wait.until(lambda b: b.find_elements(By.ID, "refused"))
        shot("kill-refused")
        browser.find_element(By.LINK_TEXT, "Sign in").click()
        browser.find_element(By.ID, "user").send_keys("guest")
        browser.find_element(By.ID, "password").send_keys("guest")
        browser.find_element(By.ID, "signin-submit").click()
        wait.until(lambda b: b.find_elements(By.ID, "confirm"))       # back on the confirmation, signed in
        assert text("#whoami") == "guest"
        shot("kill-confirm")
        browser.find_element(By.ID, "confirm").click()
        wait.until(lambda b: b.current_url.endswith(f"/tasks/{task_id}"))
        wait.until(lambda b: text("#state") == "killed")           # the live stream brings the end
        assert text("#finished").endswith("UTC") and text("#message") != "—"
        assert web_cluster.task(task_id)["state"] == "killed"
        shot("task-killed")

        # The tasks table, filtered by state through the URL.
        browser.get(f"{url}/tasks?state=killed")
        rows = browser.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task-id="{task_id}"]')
        assert len(rows) == 1 and "killed" in rows[0].text
        selected = browser.find_element(By.CSS_SELECTOR, 'select[name="state"] option[selected]')
        assert selected.get_attribute("value") == "killed"
        shot("tasks-killed")
        browser.get(f"{url}/tasks?state=running")
        assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-task-id="{task_id}"]')

        browser.get(url + "/nodes")
        assert "online" in text('#nodes tr[data-node="node1"]')
        shot("nodes")
    except Exception:
        shot("failure")
        raise
