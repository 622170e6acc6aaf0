"""The web console in a real headless Chromium against a real hub, with a device
calling home with the real `ssh -R`."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
from browser import chromium, screenshots  # noqa: F401 (the fixture)
from conftest import CALLHOME_PASSWORD
from helpers import HubProcess, wait_for
from tunnel_helpers import Device, Listener

pytestmark = pytest.mark.e2e

PUBLIC = "127.0.0.2"  # stands for the hub's public address (all of 127/8 is loopback)


def refused(port: int, host: str) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def sign_in(driver: Any, base: str, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/signin")
    driver.find_element(By.NAME, "user").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form[action='/signin'] button").click()
    try:
        wait_for(lambda: driver.current_url.endswith("/nodes"), 20, f"{user} to be signed in")
    except AssertionError:
        raise AssertionError(f"{driver.current_url}: {driver.page_source[:2000]}") from None


def sign_out(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "form[action='/signout'] button").click()
    wait_for(lambda: driver.current_url.endswith("/signin"), 10, "the sign-in page")
    assert driver.get_cookies() == []


def row_of(driver: Any, name: str) -> str:
    # One script, so the live refresh cannot replace the table between finding a row and
    # reading it.
    return str(driver.execute_script(
        "const rows = document.querySelectorAll('#node-table tbody tr');"
        "for (const row of rows) {"
        "  for (const a of row.querySelectorAll('a')) {"
        "    if (a.textContent.trim() === arguments[0]) return row.innerText; } }"
        "return '';", name))


def text_of(driver: Any, element_id: str) -> str:
    """The element's text, or "" while the page that has it is not (yet) shown."""
    return str(driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.textContent : '';",
        element_id))


@pytest.mark.xdist_group("chromium")  # one Chromium at a time
def test_console_in_chromium(tmp_path: Path, chromium: Any) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    driver = chromium
    shots = screenshots()
    hub = HubProcess(tmp_path / "hub", "--public-interface", PUBLIC,
                     "--web", "ssl:0:interface=127.0.0.1")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.cli("user", "add", "root", "--admin", "--password-stdin", stdin=b"root-pw")
    hub.cli("user", "add", "alice", "--allow", "site-*", "--password-stdin", stdin=b"alice-pw")
    hub.start()
    service = Listener(lambda conn: (conn.sendall(b"x"), conn.close()))
    device = Device(hub, tmp_path, "site-a")
    other = Device(hub, tmp_path, "lab-1")  # registered, never granted to alice
    try:
        base = f"https://127.0.0.1:{web_port(hub)}"
        log = hub.log_text()
        assert "web console certificate" in log and "SHA256 fingerprint" in log
        sign_in(driver, base, "root", "root-pw")
        assert "pending" in row_of(driver, "site-a") and "offline" in row_of(driver, "site-a")
        assert row_of(driver, "lab-1")
        driver.execute_script("window.notReloaded = true;")
        # The device calls home: the list shows it online without a reload.
        hub.cli("approve", "site-a")
        device.connect(f"0:127.0.0.1:{service.port}")
        wait_for(lambda: "online" in row_of(driver, "site-a").replace("offline", ""), 20,
                 "the live list to show site-a online")
        assert driver.execute_script("return window.notReloaded === true;")
        assert "approved" in row_of(driver, "site-a")
        driver.save_screenshot(str(shots / "node-list.png"))

        driver.get(f"{base}/nodes/site-a")  # a click can land on a row being replaced
        port = hub_port(hub, "site-a")
        assert refused(port, PUBLIC)
        assert text_of(driver, "access") == "OFF"
        driver.find_element(By.XPATH, "//button[text()='Switch ON']").click()
        wait_for(lambda: text_of(driver, "access") == "ON", 10, "ON")
        wait_for(lambda: not refused(port, PUBLIC), 10, "the SDT port open on the public side")
        assert f"public {PUBLIC}" in driver.page_source
        assert "root@127.0.0.1" in driver.find_element(By.CSS_SELECTOR, "table.history").text
        driver.save_screenshot(str(shots / "node-page.png"))
        sign_out(driver)

        sign_in(driver, base, "alice", "alice-pw")
        assert row_of(driver, "site-a") and not row_of(driver, "lab-1")
        driver.find_element(By.LINK_TEXT, "site-a").click()
        wait_for(lambda: text_of(driver, "access") == "ON", 10, "the node page")
        assert not driver.find_elements(By.XPATH, "//button[starts-with(text(), 'Switch')]")
        # Switching by hand (with her own valid CSRF token) is refused too.
        status = driver.execute_script(
            "const t = document.querySelector('input[name=csrf]').value;"
            "return fetch('/nodes/site-a/access', {method: 'POST', headers: "
            "{'Content-Type': 'application/x-www-form-urlencoded'}, "
            "body: 'value=off&csrf=' + t}).then(r => r.status);")
        assert status == 403 and not refused(port, PUBLIC)
        driver.get(f"{base}/nodes/lab-1")
        assert "404 Not found" in driver.find_element(By.TAG_NAME, "h1").text
        driver.save_screenshot(str(shots / "operator-404.png"))
        driver.get(f"{base}/nodes")
        sign_out(driver)
        audit = hub.cli("audit").stdout.decode()
        assert re.search(r"root@127\.0\.0\.1 +access +site-a +on via web", audit), audit
    finally:
        device.close()
        other.close()
        service.close()
        hub.stop()


def hub_port(hub: HubProcess, name: str) -> int:
    import json

    [node] = [n for n in json.loads(hub.cli("nodes", "--json").stdout) if n["name"] == name]
    return int(node["forwards"]["ssh"])


def web_port(hub: HubProcess) -> int:
    return hub.ports["web"]  # HubProcess.start waited for it


def test_weblink_over_real_ssh_signs_in_once(tmp_path: Path) -> None:
    """`ssh alice@hub weblink` with the real OpenSSH client: the URL names the address
    the connection reached and the console's port, and signs in once."""
    import urllib.error
    import urllib.request

    from helpers import SSHClient, make_key

    hub = HubProcess(tmp_path / "hub", "--web", "tcp:0:interface=127.0.0.1")
    hub.data.mkdir(parents=True)
    key = make_key(tmp_path / "alice", "alice")
    hub.cli("user", "add", "alice", "--key", f"{key}.pub")
    hub.start()
    try:
        port = web_port(hub)
        result = SSHClient(tmp_path / "client", hub.port).run("alice@127.0.0.1", "weblink",
                                                              key=key)
        assert result.returncode == 0, result.stderr
        url = result.stdout.decode().strip()
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/signin/[A-Za-z0-9_-]{{43}}", url)

        def post() -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=b"",
                                                                   method="POST"), timeout=30):
                    return 200
            except urllib.error.HTTPError as e:
                return e.code

        # urllib follows the 303 to /nodes without the Secure cookie (plain HTTP): the
        # answer is the sign-in page; the second use of the link is refused.
        assert post() == 200
        assert post() == 403
        assert "weblink" in hub.cli("audit").stdout.decode()
        assert "Accepted web sign-in (one-time link) for alice from 127.0.0.1" in hub.log_text()
    finally:
        hub.stop()


@pytest.mark.xdist_group("chromium")  # one Chromium at a time
def test_web_terminal_and_device_web_ui_in_chromium(tmp_path: Path, chromium: Any  # noqa: F811
                                                    ) -> None:
    """The node page's "Web terminal" runs a command on the device's real sshd; its
    "Browse" shows the device's own web page through the tunnel."""
    import subprocess
    import sys

    from helpers import DeviceSSHD, free_port
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium
    shots = screenshots()
    hub = HubProcess(tmp_path / "hub", "--web", "ssl:0:interface=127.0.0.1")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.cli("user", "add", "alice", "--allow", "site-*", "--password-stdin", stdin=b"alice-pw")
    hub.start()
    sshd = DeviceSSHD(tmp_path / "sshd", [hub.data / "keys" / "hub_mgmt_ed25519_key.pub"]
                      ).start()
    site = tmp_path / "device-www"
    site.mkdir()
    (site / "index.html").write_text("<html><head><title>Device UI</title></head><body>"
                                     "<h1>Router status: all links up</h1>"
                                     "<a href='/status.html'>details</a></body></html>")
    (site / "status.html").write_text("<html><body><p>uplink wwan0: 42 dBm</p></body></html>")
    web_port_on_device = free_port()
    www = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                            "--directory", str(site), str(web_port_on_device)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    device = Device(hub, tmp_path, "site-a")
    try:
        wait_for(lambda: not refused(web_port_on_device, "127.0.0.1"), 10, "the device's www")
        device.connect(f"0:127.0.0.1:{sshd.port}", f"80:127.0.0.1:{web_port_on_device}")
        hub.cli("approve", "site-a")  # logs in with the management key, pins the host key
        base = f"https://127.0.0.1:{web_port(hub)}"
        sign_in(driver, base, "alice", "alice-pw")
        driver.get(f"{base}/nodes/site-a")
        driver.find_element(By.LINK_TEXT, "Web terminal").click()
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".xterm-rows"), 20, "xterm")

        def screen() -> str:
            return str(driver.find_element(By.CSS_SELECTOR, ".xterm-rows").text)

        wait_for(lambda: "#" in screen(), 20, "the device's shell prompt")
        typing = driver.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
        typing.send_keys("echo web-$((6*7)); tty", Keys.ENTER)
        wait_for(lambda: "web-42" in screen() and "/dev/pts/" in screen(), 20,
                 "the command's output in the terminal")
        driver.save_screenshot(str(shots / "web-terminal.png"))
        typing.send_keys("exit", Keys.ENTER)
        wait_for(lambda: "via web terminal" in hub.cli("audit").stdout.decode(), 10,
                 "the terminal session audited")

        driver.get(f"{base}/nodes/site-a")
        driver.find_element(By.LINK_TEXT, "Browse").click()
        wait_for(lambda: "Router status: all links up" in driver.page_source, 20,
                 "the device's page through the proxy")
        assert driver.current_url == f"{base}/nodes/site-a/web/"
        assert driver.title == "Device UI"
        driver.save_screenshot(str(shots / "device-web-ui.png"))
        # The device's own path-absolute link stays on the device (the page is rewritten).
        driver.find_element(By.LINK_TEXT, "details").click()
        wait_for(lambda: "uplink wwan0: 42 dBm" in driver.page_source, 20, "the linked page")
        assert driver.current_url == f"{base}/nodes/site-a/web/status.html"
        audit = hub.cli("audit").stdout.decode()
        assert re.search(r"alice@127\.0\.0\.1 +browse +site-a", audit), audit
    finally:
        device.close()
        www.terminate()
        www.wait(10)
        sshd.stop()
        hub.stop()
