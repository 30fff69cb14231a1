"""Drives `shoal api`'s chat page in headless Chromium through the DevTools protocol:
types a question and sends it with Enter, waits for the streamed answer, starts a long
answer and stops it with the Stop button, and saves a screenshot. Prints one JSON
object.

    python3 chat_page.py CHROMIUM URL SCREENSHOT.png
"""
import base64
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import websocket

chromium, url, shot = sys.argv[1], sys.argv[2], sys.argv[3]
profile = tempfile.mkdtemp()
# Without the background-networking flags Chromium tries hosts this sandbox cannot
# reach; --no-sandbox because tests may run as root.
browser = subprocess.Popen(
    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
     "--no-first-run", "--disable-background-networking", "--disable-component-update",
     "--disable-sync", "--hide-scrollbars", "--window-size=1100,800",
     "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
found = threading.Event()
port = []


def read_stderr():
    # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/...", then drained.
    for line in browser.stderr:
        m = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
        if m and not port:
            port.append(m.group(1))
            found.set()


threading.Thread(target=read_stderr, daemon=True).start()
try:
    if not found.wait(60):
        sys.exit("chromium did not open its DevTools port")
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port[0]}/json"))
    page = next(t for t in targets if t["type"] == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120)
    calls = [0]

    def call(method, **params):
        calls[0] += 1
        ws.send(json.dumps({"id": calls[0], "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == calls[0]:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(expr):
        r = call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(what, expr, limit=120):
        deadline = time.time() + limit
        while time.time() < deadline:
            value = js(expr)
            if value:
                return value
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}: {expr}")

    def type_and_enter(words):
        js("document.getElementById('prompt').focus()")
        call("Input.insertText", text=words)
        for kind in ("keyDown", "keyUp"):
            call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                 windowsVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))

    last = "[...document.querySelectorAll('.message.assistant')].pop()"
    call("Page.navigate", url=url + "/chat")
    wait("the page", "document.body && document.body.dataset.loaded === 'true'")
    out = {"models": js("[...document.querySelectorAll('#model option')].map(o => o.value)")}
    js("""document.getElementById('temperature').value = '0';
          document.getElementById('max_tokens').value = '24';
          document.getElementById('seed').value = '7';""")
    type_and_enter("What is the capital of France? Answer in one sentence.")
    wait("the answer", f"(() => {{ const m = {last}; return m && m.dataset.state === 'done'; }})()")
    out["answer"] = js(f"{last}.querySelector('.content').textContent")
    out["route"] = js(f"[...{last}.querySelectorAll('.route .hop')].map(h => [h.dataset.peer, h.dataset.span])")

    js("document.getElementById('max_tokens').value = '400'")
    type_and_enter("Write a very long story about a dragon who collects teacups.")
    wait("the long answer to start", f"{last}.querySelector('.content').textContent.length > 20")
    out["stop_shown"] = js("!document.getElementById('stop').hidden")
    js("document.getElementById('stop').click()")
    wait("the answer to stop", f"{last}.dataset.state === 'stopped'")
    out["stopped"] = js(f"{last}.querySelector('.content').textContent")
    out["send_back"] = js("!document.getElementById('send').hidden")
    out["stored"] = js("JSON.parse(localStorage.getItem('shoal.conversations'))[0].messages.length")
    out["listed"] = js("document.querySelectorAll('#conversations li').length")

    png = call("Page.captureScreenshot", format="png")["data"]
    with open(shot, "wb") as f:
        f.write(base64.b64decode(png))
    print(json.dumps(out))
finally:
    browser.kill()
