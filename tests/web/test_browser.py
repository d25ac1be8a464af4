"""End to end in a real headless browser (Debian's chromium + chromium-driver through Selenium) against
`protocol-monitor serve` started as its own process on alerts produced by replaying published scenarios.
Screenshots of the inbox, an alert page and a subject page go to .ci/output/screenshots/ (git-ignored)."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from monitor.broker import free_port
from monitor.store import AlertStore
from tests.conftest import SHARED
from tests.web.inboxtools import PASSWORDS, fill, publish_late

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[2] / ".ci" / "output" / "screenshots"
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extra)")
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()) and not os.environ.get("CI"),
    reason="chromium and chromium-driver are not installed (Debian packages; .ci/run installs them)")

from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException, StaleElementReferenceException, TimeoutException)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    url, events = fill(tmp)
    port = free_port()
    env = {**os.environ, "PROTOCOL_MONITOR_WEB__SESSION_SECRET": "test-secret-" + "x" * 32,
           "PROTOCOL_MONITOR_WEB__POLL_SECONDS": "1", "PROTOCOL_MONITOR_WEB__MAX_FAILED_SIGNINS": "3"}
    registry = SHARED / "protocol" / "NCT04656184-registry-record.txt"
    if registry.is_file():
        env["PROTOCOL_MONITOR_WEB__REGISTRY_RECORD"] = str(registry)
    log = (tmp / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "monitor", "serve", "--store", url, "--events", str(events),
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2)  # noqa: S310 - loopback test server
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("serve did not start: " + (tmp / "serve.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        yield {"url": url, "events": events, "base": base, "tmp": tmp}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        logged = (tmp / "serve.log").read_text()
        assert not any(secret in logged for secret in PASSWORDS.values())  # passwords are never logged
        assert SEEN_COOKIES and not any(cookie in logged for cookie in SEEN_COOKIES)  # nor session cookies


@pytest.fixture()
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(height + 40, 800), 4000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


SEEN_COOKIES: list[str] = []


def sign_in(driver, base: str, username: str, password: str | None = None) -> None:
    driver.get(base + "/signin")
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(password if password is not None else PASSWORDS[username])
    driver.find_element(By.ID, "signin").click()
    wait(driver, lambda d: "/signin" not in d.current_url or d.find_elements(By.ID, "error"))
    cookie = driver.get_cookie("pm_session")
    if cookie:
        SEEN_COOKIES.append(cookie["value"])


def wait(driver, condition, timeout: float = 20):
    """Poll until `condition` holds; an element read while the page is being replaced (a form just posted) is
    looked up again at the next poll instead of failing the test."""
    return WebDriverWait(driver, timeout, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(lambda d: condition(d))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=60)


def fetch(driver, base: str, path: str) -> str:
    """GET with the browser's session cookie (a download in headless Chromium is awkward to read back)."""
    cookie = driver.get_cookie("pm_session")
    request = urllib.request.Request(base + path, headers={"Cookie": f"pm_session={cookie['value']}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback test server
        return response.read().decode()


def h12(url: str) -> dict:
    return AlertStore(url=url).inbox(sites=None, rule="DOSE-H12-MISSED-ESCALATION")[0]


def test_safety_officer_closes_the_h12_alert_with_a_signature(world, browser):
    base, url = world["base"], world["url"]
    sign_in(browser, base, "dr.officer")
    wait(browser, lambda d: d.find_elements(By.ID, "alerts"))
    counts = AlertStore(url=url).counts(sites=None)["by_site"]
    for site, by_state in counts.items():
        row = browser.find_element(By.CSS_SELECTOR, f'#counts-by-site tr[data-site="{site}"]')
        for state in ("raised", "acknowledged", "closed", "withdrawn"):
            cell = row.find_element(By.CSS_SELECTOR, f'td[data-state="{state}"]')
            assert int(cell.text) == by_state.get(state, 0), (site, state)
    assert {"FR-BIC-01", "FR-TLS-03"} <= set(counts)
    first = browser.find_element(By.CSS_SELECTOR, "tr.alert-row")
    assert "raised" in first.get_attribute("class")  # open alerts first
    shot(browser, "inbox")
    alert = h12(url)
    browser.find_element(By.CSS_SELECTOR, f'tr[data-alert="{alert["alert_id"]}"] a[href^="/alerts/"]').click()
    wait(browser, lambda d: d.find_elements(By.ID, "evidence"))
    assert browser.find_element(By.ID, "rule-id").text == "DOSE-H12-MISSED-ESCALATION"
    evidence = browser.find_element(By.ID, "evidence").text
    assert "assessed_c 38.5" in evidence and "given_mg_per_kg 0" in evidence
    assert "ANA-004-E019" in browser.find_element(By.ID, "evidence-events").text
    assert "supplementary dose of 2 mg/Kg" in browser.find_element(By.ID, "source").text
    # the subject chart: the H12 marker, the febrile reading and the doses
    browser.find_element(By.ID, "subject-link").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "svg.subject-chart"))
    svg = browser.find_element(By.CSS_SELECTOR, "svg.subject-chart")
    assert svg.find_elements(By.CSS_SELECTOR, 'g.marker[data-marker="H12"]')
    assert svg.find_elements(By.CSS_SELECTOR, 'circle.reading.febrile[data-event="ANA-004-E019"]')
    assert len(svg.find_elements(By.CSS_SELECTOR, "rect.dose")) >= 2
    assert svg.find_elements(By.CSS_SELECTOR, f'a.alert-marker[data-alert="{alert["alert_id"]}"]')
    shot(browser, "subject")
    browser.get(f"{base}/alerts/{alert['alert_id']}")
    Select(browser.find_element(By.ID, "close-reason")).select_by_visible_text("not a deviation")
    browser.find_element(By.ID, "close-text").send_keys("fever resolved before H12+3h per source notes")
    browser.find_element(By.ID, "close-password").send_keys(PASSWORDS["dr.officer"])
    browser.find_element(By.ID, "close-submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "alert-state").text == "closed")
    row = browser.find_element(By.CSS_SELECTOR, 'tr.history-row.signed[data-action="close"]')
    assert "Dr Olivia Officer" in row.text and "closed: not a deviation" in row.text
    assert "signed electronically" in row.text and "+01:00" in row.text
    shot(browser, "alert")
    result = cli("audit", "verify", "--store", url)
    assert result.returncode == 0 and "intact" in result.stdout


def test_site_monitor_of_another_site_sees_none_of_it(world, browser):
    base, url = world["base"], world["url"]
    alert = h12(url)
    sign_in(browser, base, "cra.toulouse")
    wait(browser, lambda d: d.find_elements(By.ID, "alerts"))
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.alert-row")
    assert rows and {r.get_attribute("data-site") for r in rows} == {"FR-TLS-03"}
    assert not browser.find_elements(By.CSS_SELECTOR, '#counts-by-site tr[data-site="FR-BIC-01"]')
    assert "FR-BIC-01" not in browser.find_element(By.ID, "live").text
    browser.get(f"{base}/alerts/{alert['alert_id']}")
    assert "No such alert" in browser.page_source and alert["message"] not in browser.page_source
    browser.get(f"{base}/subjects/{alert['subject_id']}")
    assert "No such subject" in browser.page_source and "<svg" not in browser.page_source
    exported = list(csv.DictReader(io.StringIO(fetch(browser, base, "/inbox.csv"))))
    assert exported and {r["site_id"] for r in exported} == {"FR-TLS-03"}
    assert not list(csv.DictReader(io.StringIO(fetch(browser, base, "/inbox.csv?site=FR-BIC-01"))))


def test_refusals_wrong_signature_lockout_and_csrf(world, browser):
    base, url = world["base"], world["url"]
    store = AlertStore(url=url)
    target = next(a for a in store.inbox(sites=None, state="raised") if a["rule"] != "DOSE-H12-MISSED-ESCALATION")
    audit_before = len(store.audit_entries())
    sign_in(browser, base, "dr.officer")
    browser.get(f"{base}/alerts/{target['alert_id']}")
    Select(browser.find_element(By.ID, "close-reason")).select_by_visible_text("not a deviation")
    browser.find_element(By.ID, "close-password").send_keys("not-my-password")
    browser.find_element(By.ID, "close-submit").click()
    wait(browser, lambda d: d.find_elements(By.ID, "error"))
    assert "Wrong password" in browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "alert-state").text == "raised"
    assert AlertStore(url=url).get(target["alert_id"])["state"] == "raised"
    assert len(AlertStore(url=url).audit_entries()) == audit_before
    # a form posted without its CSRF token
    browser.get(f"{base}/alerts/{target['alert_id']}")
    browser.execute_script("document.querySelector('#form-close input[name=csrf]').remove()")
    Select(browser.find_element(By.ID, "close-reason")).select_by_visible_text("not a deviation")
    browser.find_element(By.ID, "close-password").send_keys(PASSWORDS["dr.officer"])
    browser.find_element(By.ID, "close-submit").click()
    wait(browser, lambda d: "CSRF" in d.page_source)
    assert AlertStore(url=url).get(target["alert_id"])["state"] == "raised"
    # repeated failed sign-ins lock the account (3 in this server's settings); the right password is then refused
    browser.delete_all_cookies()
    for _ in range(3):
        sign_in(browser, base, "viewer", "wrong-password-x")
        wait(browser, lambda d: d.find_elements(By.ID, "error"))
    assert AlertStore(url=url).get_user("viewer")["locked_until"]
    sign_in(browser, base, "viewer")
    wait(browser, lambda d: d.find_elements(By.ID, "error"))
    assert "locked" in browser.find_element(By.ID, "error").text
    assert "locked until" in cli("users", "list", "--store", url).stdout
    assert cli("audit", "verify", "--store", url).returncode == 0


def test_a_new_alert_appears_without_a_reload(world, browser):
    base, url = world["base"], world["url"]
    sign_in(browser, base, "cra.bicetre")
    wait(browser, lambda d: d.find_elements(By.ID, "alerts"))
    browser.execute_script("window.notReloaded = true")
    before = {r.get_attribute("data-alert") for r in browser.find_elements(By.CSS_SELECTOR, "tr.alert-row")}
    late = [a for a in publish_late(url, world["events"], world["tmp"]) if a.status == "raised"]
    assert late and all(a.alert_id not in before for a in late)
    try:
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-alert="{late[0].alert_id}"]'), 15)
    except TimeoutException:
        pytest.fail("the new alert did not appear within 15 s")
    assert browser.execute_script("return window.notReloaded === true")

