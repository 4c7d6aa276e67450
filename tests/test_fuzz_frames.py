"""A raw-frame fuzzer: random and mutated frames at a running gateway, then: does it still serve?

Each case opens a connection to ``/ws`` or ``/ws/echo`` and sends a short burst
built from a seeded generator: well-formed frames carrying odd protocol
messages, frames with random opcodes, reserved bits, lengths that lie, missing
masks, fragments interleaved with control frames, close frames with any code,
and byte-level mutations (bit flips, cuts, splices) of all of those, split at
random points across TCP segments. Then it reads what comes back and ends the
connection one of three ways (close frame, FIN, RST).

Everything the gateway sends must be well formed (unmasked, no reserved bits,
known opcodes, control payloads <= 125 bytes, valid close codes, UTF-8 text and
JSON objects on ``/ws``). Meanwhile a member of another room receives every
publication of a steady publisher, and afterwards ``/healthz`` says ok, no
connection is left behind and the log holds no traceback.

Reproduce a run with ``FUZZ_SEED=<seed>``; ``FUZZ_CASES`` sets the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hardening_support import ascrape, metric, tracebacks
from support import GatewayProcess, http_get
from wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameReader,
    RawConnection,
    close_payload,
    encode_frame,
)

from rtgateway.client import Client

SEED = int(os.environ.get("FUZZ_SEED", "20261128"))
CASES = int(os.environ.get("FUZZ_CASES", "600"))
CONCURRENCY = 24
MAX_MESSAGE_BYTES = 8192
VALID_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


# Generators: everything draws from one random.Random, so a seed replays a run.


def json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**53, -(2**63), 10**30, rng.randrange(-(10**9), 10**9)])
    if kind == 2:
        return rng.choice([0.5, -1e308, 1e-308, rng.random()])
    if kind in (3, 4, 5):
        alphabet = 'ab é€😀"\\\n\t\x00/<>'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
    if kind in (6, 7):
        return [json_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {f"k{i}": json_value(rng, depth + 1) for i in range(rng.randrange(0, 4))}


ODD_TEXTS = [
    "",
    "{",
    "null",
    "[]",
    '{"op":null}',
    '{"op":"publish","room":"fuzz","data":NaN}',
    '{"op":"publish","room":"fuzz","data":"\\ud800"}',
    '{"op":"publish","room":"fuzz","data":' + "9" * 5000 + "}",
    '{"op":"publish","room":"fuzz","data":' + "[" * 3000 + "]" * 3000 + "}",
    '{"op":"join","room":"' + "r" * 200 + '"}',
    '{"op":"join","room":"fuzz","policy":"drop_oldest","id":"x"}',
    '{"op":"ping","id":' + "1" * 30 + "}",
    '{"op":"publish","room":"fuzz","data":1,"op":"join"}',
]


def protocol_text(rng: random.Random) -> bytes:
    """A room-protocol message: valid, nearly valid, or odd."""
    if rng.random() < 0.25:
        return rng.choice(ODD_TEXTS).encode()
    op = rng.choice(["join", "leave", "publish", "ping", "publish", "dance", ""])
    msg: dict[str, Any] = {"op": op}
    if rng.random() < 0.9:
        msg["room"] = rng.choice(["fuzz", "fuzz", "watch-not", "a" * 129, "bad room", "é", 7])
    if rng.random() < 0.7:
        msg["id"] = rng.choice([1, "id", -5, 2**60, None, [], True])
    if op == "publish" or rng.random() < 0.2:
        msg["data"] = json_value(rng)
    return json.dumps(msg, ensure_ascii=rng.random() < 0.5).encode()


def payload(rng: random.Random, opcode: int) -> bytes:
    if opcode in (OP_PING, OP_PONG):
        return rng.randbytes(rng.choice([0, 1, 125, 126, 200]))
    if opcode == OP_CLOSE:
        code = rng.choice([None, 1000, 1001, 1002, 999, 1004, 1005, 1006, 1015, 3000, 4999, 5000])
        reason = rng.choice([b"", b"bye", b"\xff\xfe", "é".encode(), b"r" * 130])
        return close_payload(code, reason) if rng.random() < 0.9 else b"\x03"
    choice = rng.random()
    if choice < 0.5:
        return protocol_text(rng)
    if choice < 0.7:
        return rng.randbytes(rng.choice([0, 1, 10, 125, 126, 1000, MAX_MESSAGE_BYTES + 1]))
    if choice < 0.85:
        # Text that is almost UTF-8: a valid message with one byte broken.
        data = bytearray(protocol_text(rng))
        if data:
            data[rng.randrange(len(data))] = rng.choice([0x80, 0xC0, 0xED, 0xF5, 0xFF])
        return bytes(data)
    return b"x" * rng.choice([MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES])


def random_frame(rng: random.Random, hostility: float) -> bytes:
    """One frame; ``hostility`` (0-1) is how likely each field is to break a rule."""
    if rng.random() < hostility * 0.4:
        opcode = rng.choice([*range(3, 8), *range(11, 16), OP_CONT])
    else:
        opcode = rng.choice([OP_TEXT] * 8 + [OP_BINARY, OP_PING, OP_PONG, OP_CLOSE])
    kwargs: dict[str, Any] = {
        "fin": rng.random() > hostility * 0.3,
        "rsv": rng.choice([1, 2, 4, 7]) if rng.random() < hostility * 0.2 else 0,
        "mask": rng.random() > hostility * 0.1,
    }
    if rng.random() < 0.1:
        kwargs["length_form"] = rng.choice(["7", "16", "64"])
    body = payload(rng, opcode) if rng.random() < hostility + 0.2 else protocol_text(rng)
    if rng.random() < hostility * 0.1:
        # A length that lies: longer (the rest never comes) or far too long.
        kwargs["length"] = rng.choice([len(body) + 1, 2**31, 2**63 - 1])
    if kwargs.get("length_form") == "7" and len(body) > 125:
        del kwargs["length_form"]
    return encode_frame(opcode, body, **kwargs)


def fragmented_message(rng: random.Random, hostility: float) -> bytes:
    """A message in fragments, control frames in between, sometimes broken."""
    if rng.random() < 1 - hostility * 0.5:
        body = protocol_text(rng)
    else:
        body = rng.randbytes(rng.randrange(1, 300))
    cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randrange(1, 6))))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    frames = []
    for i, piece in enumerate(pieces):
        opcode = OP_TEXT if i == 0 else OP_CONT
        if rng.random() < hostility * 0.2:
            opcode = rng.choice([OP_TEXT, OP_BINARY, OP_CONT])
        frames.append(encode_frame(opcode, piece, fin=i == len(pieces) - 1))
        if rng.random() < 0.3:
            frames.append(encode_frame(rng.choice([OP_PING, OP_PONG]), rng.randbytes(4)))
        if rng.random() < hostility * 0.1:
            frames.append(encode_frame(OP_CLOSE, close_payload(1000)))
    return b"".join(frames)


def mutate(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return rng.randbytes(rng.randrange(1, 64))
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(5)
        at = rng.randrange(len(buf)) if buf else 0
        if kind == 0 and buf:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del buf[at : at + rng.randrange(1, 16)]
        elif kind == 2:
            buf[at:at] = rng.randbytes(rng.randrange(1, 16))
        elif kind == 3 and buf:
            buf[at : at + 1] = bytes([rng.choice([0x00, 0x7F, 0x80, 0xFF])])
        else:
            buf[at:at] = buf[at : at + rng.randrange(1, 32)]
    return bytes(buf)


def burst(rng: random.Random) -> bytes:
    """What one case sends: from polite-but-odd messages to byte soup."""
    hostility = rng.choice([0.0, 0.0, 0.1, 0.3, 0.6, 1.0])
    parts = []
    for _ in range(rng.randrange(1, 10)):
        kind = rng.random()
        if kind < 0.4:
            part = random_frame(rng, hostility)
        elif kind < 0.6:
            part = fragmented_message(rng, hostility)
        elif kind < 0.62 + hostility * 0.05:
            part = struct.pack("!BBQ", 0x82, 0xFF, rng.randrange(2**16, 2**63)) + b"mask"
        else:
            part = encode_frame(OP_TEXT, protocol_text(rng))
        if rng.random() < hostility * 0.4:
            part = mutate(rng, part)
        parts.append(part)
    return b"".join(parts)


def segments(rng: random.Random, data: bytes) -> Iterator[bytes]:
    """``data`` cut at random points, as separate writes."""
    if len(data) < 2 or rng.random() < 0.5:
        yield data
        return
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 6))))
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        yield data[a:b]


# What the gateway sends back must be well formed.


def check_server_frame(frame: Frame, path: str) -> None:
    assert not frame.masked, "a server frame was masked (RFC 6455 §5.1)"
    assert frame.rsv == 0, "a server frame had reserved bits set"
    assert frame.opcode in (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG), frame.opcode
    if frame.opcode >= OP_CLOSE:
        assert frame.fin and len(frame.payload) <= 125, "a bad control frame from the server"
    if frame.opcode == OP_CLOSE and frame.payload:
        (code,) = struct.unpack("!H", frame.payload[:2])
        # Its own codes, or the peer's echoed back (3000-4999 are registered/private).
        assert code in VALID_CLOSE_CODES or 3000 <= code <= 4999, code
        frame.payload[2:].decode("utf-8")
    if frame.opcode == OP_TEXT:
        text = frame.payload.decode("utf-8")  # never invalid UTF-8 out
        if path == "/ws":
            assert isinstance(json.loads(text), dict)


async def fuzz_case(port: int, index: int) -> str:
    rng = random.Random(f"{SEED}-{index}")
    path = rng.choice(["/ws", "/ws/echo"])
    conn = await RawConnection.open(port, path)
    reader = FrameReader()
    try:
        if path == "/ws" and rng.random() < 0.7:
            await conn.send_frame(OP_TEXT, b'{"op":"join","room":"fuzz"}')
        with contextlib.suppress(ConnectionError):
            for chunk in segments(rng, burst(rng)):
                await conn.send(chunk)
                if rng.random() < 0.2:
                    # A pause is part of the input: the next chunk arrives in a read of its own.
                    await asyncio.sleep(0.01)
        # Read what comes back for a moment; the gateway may close first.
        deadline = time.monotonic() + 0.3
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(conn.reader.read(1 << 16), left)
            except (TimeoutError, ConnectionError):
                break
            if not data:
                break
            for frame in reader.feed(data):
                check_server_frame(frame, path)
        ending = rng.choice(["close_frame", "fin", "rst"])
        if ending == "close_frame":
            with contextlib.suppress(ConnectionError, TimeoutError):
                await conn.send_frame(OP_CLOSE, close_payload(1000))
                # The closing handshake: the gateway answers and ends the TCP connection.
                await conn.wait_eof(timeout=2)
        if ending == "rst":
            conn.abort()
        else:
            await conn.close()
        return path
    except BaseException:
        conn.abort()
        raise


@pytest.mark.timeout(180)
async def test_random_and_mutated_frames_leave_the_gateway_serving() -> None:
    """Random and mutated frames: valid frames out, every publication in, no traceback."""
    env = {"RTG_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES), "RTG_STATS_INTERVAL_S": "0"}
    with GatewayProcess(env) as gw:
        assert gw.port is not None
        async with (
            Client.connect(gw.ws_url + "/ws") as watcher,
            Client.connect(gw.ws_url + "/ws") as publisher,
        ):
            await watcher.join("watch")
            await publisher.join("watch")
            published: list[int] = []
            stop = asyncio.Event()

            async def publish_steadily() -> None:
                i = 0
                while not stop.is_set():
                    published.append(await publisher.publish("watch", {"i": i}))
                    i += 1
                    await asyncio.sleep(0.02)  # a steady stream for as long as the fuzzing runs

            steady = asyncio.ensure_future(publish_steadily())
            paths: dict[str, int] = {}
            failures: list[str] = []
            semaphore = asyncio.Semaphore(CONCURRENCY)

            async def one(index: int) -> None:
                async with semaphore:
                    try:
                        path = await fuzz_case(gw.port or 0, index)
                    except AssertionError as exc:
                        failures.append(f"case {index} (FUZZ_SEED={SEED}): {exc}")
                        return
                    paths[path] = paths.get(path, 0) + 1

            await asyncio.gather(*(one(i) for i in range(CASES)))
            stop.set()
            await steady
            assert not failures, "\n".join(failures[:10])
            assert sum(paths.values()) == CASES and len(paths) == 2, paths

            # The member of the other room got every publication, in order.
            got = [(await watcher.next_message(10))["seq"] for _ in published]
            assert got == published == list(range(1, len(published) + 1))
            assert (await watcher.ping())["op"] == "pong"

            # Nothing left behind: only the watcher and the publisher remain.
            deadline = time.monotonic() + 15
            while True:
                samples = await ascrape(gw.url)
                if metric(samples, "rtgateway_connections_current") == 2:
                    break
                assert time.monotonic() < deadline, "fuzz connections were left open"
                await asyncio.sleep(0.1)

        status, body, _ = await asyncio.to_thread(http_get, gw.url + "/healthz")
        assert (status, body) == (200, "ok")
        assert gw.proc is not None and gw.proc.poll() is None
        bad = tracebacks(gw.lines)
        assert not bad, "\n".join(bad[:5])
