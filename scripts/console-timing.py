#!/usr/bin/env python3
"""Times console pages in headless Chromium against a running server (standard library only).

Usage: scripts/console-timing.py PORT   (admin must have the console password "a long passphrase")
Used with the data the control-plane bench keeps (REACHBACK_BENCH_KEEP=1): see docs/benchmarks.md.
"""
import json, urllib.request, time, subprocess, sys
port = sys.argv[1]
p = subprocess.Popen(["chromedriver", "--port=9518"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1)
def call(method, path, body=None):
    req = urllib.request.Request("http://127.0.0.1:9518" + path, method=method, data=json.dumps(body).encode() if body is not None else None, headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))["value"]
S = "/session/" + call("POST", "/session", {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800", "--user-data-dir=" + __import__("tempfile").mkdtemp() + ""]}}}})["sessionId"]
def ex(script): return call("POST", S + "/execute/sync", {"script": script, "args": []})
base = f"http://127.0.0.1:{port}"
call("POST", S + "/url", {"url": base + "/"})
time.sleep(1)
ex("document.getElementById('username').value='admin'; document.getElementById('password').value='a long passphrase'; document.querySelector('form.login button').click();")
time.sleep(2)
def measure(label, action_js, ready_js):
    times = []
    for _ in range(5):
        call("POST", S + "/url", {"url": base + "/#/settings"})
        time.sleep(1.5)
        start = time.time()
        ex(action_js)
        while not ex(ready_js):
            time.sleep(0.005)
        times.append((time.time() - start) * 1000)
    times.sort()
    print(f"{label}: median {times[2]:.0f} ms, max {times[-1]:.0f} ms")
rows_ready = "const rows = document.querySelectorAll('table[data-test=ip-bindings] tbody tr[data-row]'); const info = document.querySelector('[data-test=page-info]'); return rows.length === 50 && info && info.textContent.includes('1,000,000');"
measure("bindings page, first 50 of 1,000,000 by IP", "location.hash = '#/bindings'", rows_ready)
print(ex("return document.querySelector('[data-test=page-info]').textContent"))
times = []
for _ in range(5):
    call("POST", S + "/url", {"url": base + "/#/settings"}); time.sleep(0.5)
    call("POST", S + "/url", {"url": base + "/#/bindings"})
    while not ex(rows_ready): time.sleep(0.005)
    start = time.time()
    ex("Array.from(document.querySelectorAll('nav.pager button')).find(b => b.textContent === 'Next').click()")
    while not ex("const i = document.querySelector('[data-test=page-info]'); return i && i.textContent.startsWith('Page 2 ') && document.querySelectorAll('table[data-test=ip-bindings] tbody tr[data-row]').length === 50"): time.sleep(0.005)
    times.append((time.time() - start) * 1000)
times.sort(); print(f"bindings, Next page: median {times[2]:.0f} ms, max {times[-1]:.0f} ms")
measure("ranges page (200 ranges, page 1)", "location.hash = '#/ranges'", "return document.querySelectorAll('table[data-test=ip-ranges] tbody tr[data-row]').length === 50")
measure("dashboard", "location.hash = '#/bindings'; setTimeout(() => { location.hash = '#/dashboard'; }, 0)", "return document.querySelectorAll('main svg rect').length > 20")
call("DELETE", S)
p.kill()
