"""Docker HEALTHCHECK for the rtgateway image: GET /healthz with the standard library.

Exit 0 when the gateway answers 200, 1 otherwise (including 503 while it drains),
as Docker expects. The port (and host, when the gateway binds one address) comes
from RTG_ADDR, the same variable the gateway reads, so overriding the address at
`docker run` time keeps the check pointed at the right socket. Needs no curl or
wget in the image.
"""

import os
import sys
import urllib.request

TIMEOUT_S = 2.0


def healthz_url(addr: str) -> str:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"  # ":PORT" binds 0.0.0.0 and [::]; either answers on loopback
    elif host == "::":
        host = "::1"  # asyncio binds "::" with IPV6_V6ONLY, so 127.0.0.1 would not answer
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    url = healthz_url(os.environ.get("RTG_ADDR", ":8083"))
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError and HTTPError (503 draining) are OSErrors
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
