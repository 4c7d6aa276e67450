"""The browser client and the demo page, in a real headless Chromium.

Chromium is driven over the Chrome DevTools Protocol (CDP) with the
``websockets`` library the gateway already uses: :class:`DevTools` is one
browser-level WebSocket with flat sessions, :class:`Page` one tab
(``Runtime.evaluate``, ``Page.captureScreenshot``). No WebDriver, no downloads.

The gateway is a real subprocess (:class:`GatewayProcess`) pinned to a fixed
port where a test restarts it, so that the pages reconnect to the same URL.
The demo page's screenshot is kept as ``artifacts/demo.png``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, GatewayProcess, free_port, http_get, require_tool
from websockets.asyncio.client import ClientConnection, connect

STATIC = ROOT / "rtgateway" / "static"
ARTIFACTS = ROOT / "artifacts"

# ENVIRONMENT.md's flags, plus the ones that keep timers in background tabs
# running at full speed (the test drives several tabs at once).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
    "--remote-debugging-address=127.0.0.1",
    # Port 0: Chromium binds a port itself and writes it to DevToolsActivePort.
    "--remote-debugging-port=0",
)

# Collects a client's events in the page, for the test to read back.
RECORDER_JS = """
window.__logs ??= {};
window.__record = (name, client) => {
  const log = (window.__logs[name] = []);
  for (const type of ["statechange", "message", "gap", "close", "error"]) {
    client.addEventListener(type, (e) => log.push({ type, t: Date.now(), ...e.detail }));
  }
  return log.length;
};
"""


class CDPError(Exception):
    """An error answer to a DevTools command, or an exception thrown in the page."""


class DevTools:
    """One browser-level CDP connection; tabs are flat sessions on it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader_task = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[DevTools]:
        # Screenshots arrive as one large base64 message; CDP has its own liveness.
        async with connect(url, max_size=None, ping_interval=None) as ws:
            devtools = cls(ws)
            try:
                yield devtools
            finally:
                devtools.reader_task.cancel()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                waiter = self.waiters.pop(msg.get("id", -1), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
                # Events are not needed: the tests poll page state instead.
        finally:
            for waiter in self.waiters.values():
                if not waiter.done():
                    waiter.set_exception(CDPError("the DevTools connection closed"))

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session_id: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        msg_id = next(self.ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            msg["sessionId"] = session_id
        waiter = self.waiters[msg_id] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(waiter, timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def new_page(self, width: int = 960, height: int = 600) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, target["targetId"], attached["sessionId"])
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page


class Page:
    """One tab: navigate, evaluate JavaScript, wait for a condition, screenshot."""

    def __init__(self, devtools: DevTools, target_id: str, session_id: str) -> None:
        self.devtools = devtools
        self.target_id = target_id
        self.session_id = session_id

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.devtools.send(method, params, self.session_id)

    async def goto(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        await self.wait_for(
            f"document.readyState === 'complete' && location.href === {json.dumps(url)}",
            what=f"{url} to load",
        )
        await self.evaluate(RECORDER_JS)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (promises awaited), as JSON."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"{text}\n  in: {expression.strip()[:300]}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                shown = await self.evaluate("document.body && document.body.innerText")
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what or expression}; "
                    f"the page shows:\n{(shown or '')[-2000:]}"
                )
            await asyncio.sleep(0.1)

    async def log(self, name: str) -> list[dict[str, Any]]:
        value: list[dict[str, Any]] = await self.evaluate(f"window.__logs[{json.dumps(name)}]")
        return value

    async def screenshot(self, path: Path) -> bytes:
        # A tab behind another one produces no frames: bring it forward first.
        await self.send("Page.bringToFront")
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(result["data"])
        await asyncio.to_thread(save, path, data)
        return data


def save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# The demo page, driven through its own form controls.


async def open_demo(page: Page, base_url: str, room: str, name: str) -> None:
    await page.goto(f"{base_url}/?room={room}&name={name}")
    await page.wait_for(
        f"""rtg.state === 'open' && [...document.querySelectorAll('#log li.sys')]
            .some((li) => li.lastElementChild.textContent.startsWith('joined {room}:'))""",
        what=f"{name} to join {room}",
    )


async def say(page: Page, text: str) -> None:
    await page.evaluate(
        f"""document.getElementById('text').value = {json.dumps(text)};
            document.getElementById('publish-form').requestSubmit();"""
    )


async def wait_seen(page: Page, room: str, name: str, text: str) -> dict[str, Any]:
    """The message log entry (its data attributes) showing ``name: text`` in ``room``."""
    found: dict[str, Any] = await page.wait_for(
        f"""(() => {{
          const li = [...document.querySelectorAll('#log li.msg')].find((li) =>
            li.dataset.room === {json.dumps(room)} && li.dataset.who === {json.dumps(name)}
            && li.lastElementChild.textContent === {json.dumps(text)});
          return li ? {{ ...li.dataset }} : null;
        }})()""",
        what=f"{text!r} from {name} in {room}",
    )
    return found


# A client made by the test in a page, with its own options and a full event log.


async def make_client(page: Page, name: str, **options: Any) -> None:
    await page.evaluate(
        f"""(async () => {{
          const {{ RtGatewayClient }} = await import('/rtgateway.js');
          const client = new RtGatewayClient(undefined, {json.dumps(options)});
          window[{json.dumps(name)}] = client;
          __record({json.dumps(name)}, client);
          client.connect();
        }})()"""
    )


def metric(gw: GatewayProcess, name: str) -> float:
    _, body, _ = http_get(gw.url + "/metrics")
    match = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# Fixtures.


@pytest.fixture(scope="module")
def chromium() -> Iterator[str]:
    """A headless Chromium for this module; yields its browser DevTools URL."""
    binary = require_tool("chromium")
    profile = tempfile.mkdtemp(prefix="rtg-chromium-")
    log_path = Path(profile) / "chromium.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: renderers go with it
        )
    active_port = Path(profile) / "DevToolsActivePort"
    try:
        deadline = time.monotonic() + 30
        while not (active_port.exists() and len(active_port.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("chromium did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(0.05)
        port, path = active_port.read_text().splitlines()[:2]
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def devtools(chromium: str) -> AsyncIterator[DevTools]:
    async with DevTools.connect(chromium) as devtools:
        pages_before = {
            t["targetId"] for t in (await devtools.send("Target.getTargets"))["targetInfos"]
        }
        yield devtools
        # Close the tabs this test opened, so their clients stop reconnecting.
        for info in (await devtools.send("Target.getTargets"))["targetInfos"]:
            if info["type"] == "page" and info["targetId"] not in pages_before:
                await devtools.send("Target.closeTarget", {"targetId": info["targetId"]})


def gateway_env(port: int, **extra: str) -> dict[str, str]:
    return {
        "RTG_ADDR": f"127.0.0.1:{port}",
        "RTG_DRAIN_WINDOW_S": "0.5",
        "RTG_RECONNECT_DELAY_MS": "300",
        "RTG_OPEN_TIMEOUT_S": "2",
        **extra,
    }


# Tests that need no browser.


def test_js_client_is_the_module_the_gateway_serves() -> None:
    """clients/js/rtgateway.js is the very file the gateway serves as /rtgateway.js."""
    # One file: clients/js/rtgateway.js links to the packaged static module.
    client = ROOT / "clients" / "js" / "rtgateway.js"
    assert client.resolve() == (STATIC / "rtgateway.js").resolve()
    assert b"export class RtGatewayClient" in client.read_bytes()


def test_demo_page_and_module_are_served_and_self_contained() -> None:
    """/ and /rtgateway.js are served as committed, and the page loads nothing from elsewhere."""
    with GatewayProcess() as gw:
        status, page, headers = http_get(gw.url + "/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert page == (STATIC / "index.html").read_text()
        status, module, headers = http_get(gw.url + "/rtgateway.js")
        assert status == 200
        assert headers["Content-Type"].startswith("text/javascript")
        assert module == (STATIC / "rtgateway.js").read_text()
    # No external assets: the page loads nothing but its module, relative to itself.
    assert re.findall(r"""(?:src|href)\s*=\s*["']""", page) == []
    assert re.findall(r"""from\s+["']([^"']+)["']""", page) == ["./rtgateway.js"]
    assert not re.search(r"https?://", page)


def test_demo_page_is_served_with_a_content_security_policy_and_no_framing() -> None:
    """The demo page comes with a strict Content-Security-Policy and may not be framed."""
    with GatewayProcess() as gw:
        _, _, headers = http_get(gw.url + "/")
        _, _, module_headers = http_get(gw.url + "/rtgateway.js")
    policy = {d.split()[0]: d.split()[1:] for d in headers["Content-Security-Policy"].split("; ")}
    assert policy["default-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    # The inline script and style are allowed by their hashes, nothing else inline.
    assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
    assert [s for s in policy["script-src"] if s.startswith("'sha256-")]
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert module_headers["X-Content-Type-Options"] == "nosniff"


# Tests in a real browser.


@pytest.mark.system
async def test_two_pages_exchange_messages_and_survive_gateway_restart(
    devtools: DevTools,
) -> None:
    """Two Chromium pages exchange messages, and reconnect and rejoin after a gateway restart."""
    port = free_port()
    env = gateway_env(port)
    gateways = [await asyncio.to_thread(GatewayProcess(env).start)]
    alice, bob = await devtools.new_page(), await devtools.new_page()
    async with diagnostics({"alice": alice, "bob": bob}, gateways):
        await open_demo(alice, gateways[0].url, "lobby", "alice")
        await open_demo(bob, gateways[0].url, "lobby", "bob")
        before = {p: await p.evaluate("rtg.hello.conn_id") for p in (alice, bob)}
        for p in (alice, bob):
            await p.evaluate("__record('rtg', rtg)")

        await say(alice, "hello from alice")
        await say(bob, "hello from bob")
        seen_by_bob = await wait_seen(bob, "lobby", "alice", "hello from alice")
        seen_by_alice = await wait_seen(alice, "lobby", "bob", "hello from bob")
        assert int(seen_by_bob["seq"]) >= 1 and int(seen_by_alice["seq"]) >= 1

        # Restart: drain (1012 with a retry delay), exit, start again on the same port.
        gateways[0].signal(signal.SIGTERM)
        assert await asyncio.to_thread(gateways[0].wait, 30) == 0
        gateways.append(await asyncio.to_thread(GatewayProcess(env).start))
        gw = gateways[1]
        assert gw.port == port

        for p in (alice, bob):
            await p.wait_for("rtg.state === 'open'", timeout=60, what="the reconnection")
            assert await p.evaluate("rtg.hello.conn_id") != before[p]
            log = await p.log("rtg")
            close = next(e for e in log if e["type"] == "close")
            assert close["code"] == 1012
            advertised = re.search(r"retry_after_ms=(\d+)", close["reason"])
            assert advertised, close
            # The first retry waits exactly the delay the gateway gave.
            retry = next(e for e in log if e.get("state") == "reconnecting")
            assert retry["advertised"] is True
            assert retry["delayMs"] == int(advertised.group(1))
            assert [e["state"] for e in log if e["type"] == "statechange"][-1] == "open"

        # Both rejoined the room on the new gateway by themselves.
        await asyncio.to_thread(wait_until_metric, gw, "rtgateway_room_members_current", 2.0)
        await say(alice, "alice again")
        await say(bob, "bob again")
        await wait_seen(bob, "lobby", "alice", "alice again")
        await wait_seen(alice, "lobby", "bob", "bob again")
        for p in (alice, bob):
            assert not [e for e in await p.log("rtg") if e["type"] == "gap"]

        png = await alice.screenshot(ARTIFACTS / "demo.png")
        assert png.startswith(b"\x89PNG\r\n\x1a\n")


@contextlib.asynccontextmanager
async def diagnostics(
    pages: dict[str, Page], gateways: list[GatewayProcess]
) -> AsyncIterator[None]:
    """Stop the gateways at the end; on a failure, print what the pages and gateways saw."""
    try:
        yield
    except BaseException:
        for name, page in pages.items():
            with contextlib.suppress(Exception):
                logs = await page.evaluate("JSON.stringify(window.__logs, null, 1)")
                print(f"--- {name}: client events\n{logs}")
        for i, gw in enumerate(gateways):
            print(f"--- gateway {i} log\n" + "\n".join(gw.lines[-40:]))
        raise
    finally:
        for gw in gateways:
            gw.kill()


def wait_until_metric(gw: GatewayProcess, name: str, value: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(gw, name) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never reached {value}: {metric(gw, name)}")
        time.sleep(0.1)


@pytest.mark.system
async def test_page_from_foreign_origin_is_refused_and_never_opens(devtools: DevTools) -> None:
    """A page from an origin not allowed is refused and its client never opens."""
    # The page comes from http://127.0.0.1:PORT, which is not on the list.
    env = {"RTG_ALLOWED_ORIGINS": "https://chat.example.com"}
    with GatewayProcess(env) as gw:
        page = await devtools.new_page()
        await page.goto(gw.url + "/")
        await make_client(page, "c", initialDelayMs=50, maxDelayMs=200)
        log = await page.wait_for(
            "__logs.c.filter((e) => e.type === 'error').length >= 3 && __logs.c",
            what="three refused connection attempts",
        )
        assert {e["code"] for e in log if e["type"] == "error"} == {"socket_error"}
        assert all(e["code"] == 1006 for e in log if e["type"] == "close")
        states = {e["state"] for e in log if e["type"] == "statechange"}
        assert "open" not in states and "reconnecting" in states
        assert await page.evaluate("c.state !== 'open' && c.hello === null")
        # The demo page's own client says so on the page.
        await page.wait_for(
            "[...document.querySelectorAll('#log li.err')]"
            ".some((li) => li.textContent.includes('cannot reach the gateway'))",
            what="the demo page to show the error",
        )
        assert metric(gw, 'rtgateway_handshake_rejections_total{reason="origin"}') >= 3


@pytest.mark.system
async def test_client_drops_connection_without_pong_and_reconnects(devtools: DevTools) -> None:
    """The JS client drops a connection that stops answering pings and reconnects."""
    with GatewayProcess() as gw:
        page = await devtools.new_page()
        await page.goto(gw.url + "/")
        await make_client(
            page,
            "c",
            pingIntervalMs=200,
            pingTimeoutMs=600,
            connectTimeoutMs=1000,
            initialDelayMs=100,
            maxDelayMs=400,
        )
        await page.wait_for("c.state === 'open'", what="the client to open")
        await page.evaluate("c.join('keepalive')")
        first = await page.evaluate("c.hello.conn_id")
        try:
            gw.signal(signal.SIGSTOP)  # the socket stays up; nothing answers
            await page.wait_for(
                "__logs.c.some((e) => e.type === 'close' && e.reason === 'ping timeout')",
                what="the missing pong to be noticed",
            )
        finally:
            gw.signal(signal.SIGCONT)
        await page.wait_for(
            f"c.state === 'open' && c.hello.conn_id !== {json.dumps(first)}",
            what="a new connection",
        )
        # Publishing needs membership: the ack shows the room was rejoined.
        ack = await page.evaluate("c.publish('keepalive', 'still here')")
        assert ack["room"] == "keepalive" and ack["seq"] >= 1


@pytest.mark.system
async def test_client_reports_seq_gap_and_rejects_on_error_replies(devtools: DevTools) -> None:
    """The JS client reports a gap in seq and rejects a request answered with an error."""
    with GatewayProcess() as gw:
        async with connect(gw.ws_url + "/ws") as other:
            assert json.loads(await other.recv())["op"] == "hello"

            async def publish(data: Any) -> None:
                await other.send(json.dumps({"op": "publish", "room": "g", "data": data, "id": 1}))

            await other.send(json.dumps({"op": "join", "room": "g", "id": 0}))
            assert json.loads(await other.recv())["op"] == "ack"

            page = await devtools.new_page()
            await page.goto(gw.url + "/")
            await make_client(page, "c", initialDelayMs=50, maxDelayMs=200)
            ack = await page.evaluate("c.join('g')")
            assert ack["members"] == 2
            await publish("one")
            await page.wait_for("__logs.c.some((e) => e.data === 'one')", what="message one")

            # Away while three messages go by, then back: it rejoins and says what it missed.
            await page.evaluate("c.close()")
            for text in ("two", "three", "four"):
                await publish(text)
            # A join made while closed waits for the connection.
            await page.evaluate("window.later = c.join('later'); null")
            await page.evaluate("c.connect()")
            assert (await page.evaluate("later"))["members"] == 1
            ack = await page.evaluate("c.publish('g', 'back')")
            assert ack["seq"] == 5
            gaps = await page.wait_for(
                "(() => { const g = __logs.c.filter((e) => e.type === 'gap'); "
                "return g.length && g })()",
                what="a gap event",
            )
            assert [(g["room"], g["expected"], g["got"]) for g in gaps] == [("g", 2, 5)]
            # The other member got the browser's message.
            while (msg := json.loads(await other.recv()))["op"] != "message":
                pass
            while msg.get("data") != "back":
                msg = json.loads(await other.recv())
            assert msg["seq"] == 5

            # Error replies reject the promise with the gateway's code.
            rejected = await page.evaluate(
                """Promise.allSettled([c.publish('elsewhere', 1), c.join('no spaces')])
                   .then((r) => r.map((x) => x.reason && [x.reason.name, x.reason.code]))"""
            )
            assert rejected == [
                ["RtGatewayError", "not_joined"],
                ["RtGatewayError", "invalid_room"],
            ]
            assert await page.evaluate("c.rooms") == ["g", "later"]
            assert (await page.evaluate("c.leave('later')"))["members"] == 0
            assert await page.evaluate("c.rooms") == ["g"]


@pytest.mark.system
async def test_demo_page_shows_every_message_whatever_its_data(devtools: DevTools) -> None:
    """The demo page shows every message, whatever its data, under its own CSP."""
    # Data is any JSON value from strangers: objects whose toString is not a
    # function used to throw in the page's listener, and the message vanished.
    awkward: list[Any] = [
        {"text": {"toString": 1}},
        {"toString": "x", "valueOf": None},
        {"name": {"toString": None, "valueOf": None}, "text": "named"},
        {"text": ["a", {"toString": []}]},
        {"text": "after"},
    ]
    with GatewayProcess() as gw:
        page = await devtools.new_page()
        await open_demo(page, gw.url, "odd", "viewer")
        async with connect(gw.ws_url + "/ws") as other:
            assert json.loads(await other.recv())["op"] == "hello"
            await other.send(json.dumps({"op": "join", "room": "odd", "id": 0}))
            assert json.loads(await other.recv())["op"] == "ack"
            for i, data in enumerate(awkward, 1):
                await other.send(
                    json.dumps({"op": "publish", "room": "odd", "data": data, "id": i})
                )
        shown = await page.wait_for(
            """(() => {
              const items = [...document.querySelectorAll('#log li.msg')];
              return items.some((li) => li.lastElementChild.textContent === 'after')
                && items.map((li) => [Number(li.dataset.seq), li.lastElementChild.textContent]);
            })()""",
            what="the last message",
        )
        # Under the page's Content-Security-Policy its inline style applies too
        # (the script ran: the messages are there).
        assert await page.evaluate("getComputedStyle(document.body).display") == "flex"
    assert [seq for seq, _ in shown] == [1, 2, 3, 4, 5], shown
    texts = dict(shown)
    assert texts[1] == '{"toString":1}'
    assert texts[3] == "named"
    assert texts[5] == "after"
