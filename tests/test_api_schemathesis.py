"""Schemathesis fuzzes the live publish API from docs/api.yaml.

The real gateway runs in this test's event loop; the ``schemathesis`` command
line (pinned in requirements/api.txt) runs as a subprocess against its API
listener with every check on: no server error, every status, header, content
type and body as documented, invalid input refused, the token enforced.
A WebSocket member in the room of the document's examples sees what was
published there, in ``seq`` order.

The number of examples is bounded so the run stays well under a minute; the
seed is fixed so a run is reproducible. ``API_FUZZ_SEED`` and
``API_FUZZ_EXAMPLES`` explore further.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

from conftest import running_gateway
from support import require

from rtgateway.client import Client

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "api.yaml"
TOKEN = "fuzz-token"
SEED = os.environ.get("API_FUZZ_SEED", "20241128")
MAX_EXAMPLES = os.environ.get("API_FUZZ_EXAMPLES", "50")
RUN_TIMEOUT_S = 240


def schemathesis_command() -> str | None:
    beside = Path(sys.executable).parent / "schemathesis"
    return str(beside) if beside.exists() else shutil.which("schemathesis")


async def test_api_answers_as_its_openapi_document_says_under_fuzzing(tmp_path: Path) -> None:
    """Schemathesis, driven by docs/api.yaml, finds no answer the document does not allow."""
    command = schemathesis_command()
    require(command, "needs schemathesis: pip install --require-hashes -r requirements/api.txt")
    assert command is not None
    async with (
        running_gateway(api_token=TOKEN) as gw,
        Client.connect(gw.ws_url) as member,
    ):
        await member.join("lobby")  # the document's examples publish to lobby
        api = gw.gateway.api
        assert api is not None
        proc = await asyncio.create_subprocess_exec(
            command,
            "run",
            str(SPEC),
            "--url",
            f"http://{api.addresses[0]}",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "all",
            "--max-examples",
            MAX_EXAMPLES,
            "--seed",
            SEED,
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path / "report"),
            cwd=tmp_path,  # its example database and reports stay out of the tree
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "120"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(RUN_TIMEOUT_S):
            output_bytes, _ = await proc.communicate()
        output = output_bytes.decode(errors="replace")
        summary = [line for line in output.splitlines() if "generated" in line or "===" in line]
        print("\n".join(summary))
        assert proc.returncode == 0, output
        assert "No issues found" in output, output

        # Whatever the fuzzer published to lobby reached the member in order,
        # one seq after another; a last publication marks the end.
        marker = {"end": "of fuzzing"}
        reader, writer = await asyncio.open_connection(*api.addresses[0].rsplit(":", 1))
        body = json.dumps({"room": "lobby", "data": marker}).encode()
        writer.write(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        reply = await reader.read()
        writer.close()
        last_seq = json.loads(reply.partition(b"\r\n\r\n")[2])["seq"]
        seqs = []
        while True:
            message = await member.next_message(10)
            seqs.append(message["seq"])
            if message["data"] == marker:
                break
        assert seqs == list(range(1, last_seq + 1))
        assert last_seq > 1, "the fuzzer published nothing to lobby"
