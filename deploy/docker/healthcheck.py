"""Container health check: GET the service's /healthz (stdlib only, no curl in the image).

The URL is argv[1], else PT_HEALTHCHECK_URL, else http://127.0.0.1:<port>/healthz with the port
of whichever service's PT_<SVC>_HTTP_PORT is set (default 8001).
"""

import os
import sys
import urllib.request


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PT_HEALTHCHECK_URL")
    if not url:
        port = next(
            (os.environ[k] for k in os.environ if k.startswith("PT_") and k.endswith("_HTTP_PORT")),
            "8001",
        )
        url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
