"""`protocol-monitor demo` (what ./scripts/demo runs) also serves the inbox: it prints the address and a demo
safety-officer login that work, shows the demo's alerts, and Ctrl-C stops everything."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar


def test_demo_serves_its_alerts_in_the_inbox_and_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "demo", "--subjects", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("The inbox stays on"):
                break
        text = "".join(lines)
        found = re.search(r"The inbox stays on (http://127\.0\.0\.1:\d+/) \(user (\S+), password (\S+)\)", text)
        assert found, text[-3000:]
        base, user, password = found.groups()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        page = opener.open(base + "signin", timeout=10).read().decode()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        body = urllib.parse.urlencode({"csrf": csrf, "username": user, "password": password}).encode()
        inbox = opener.open(base + "signin", data=body, timeout=10).read().decode()
        raised = re.findall(r"RAISED\s+\S+\s+(\S+)", text)
        assert raised and all(rule in inbox for rule in raised)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    assert proc.returncode == 0 and "inbox stopped" in rest
    try:
        urllib.request.urlopen(base + "healthz", timeout=2)  # noqa: S310 - loopback
        raise AssertionError("the inbox still answers after the demo stopped")
    except urllib.error.URLError:
        pass
