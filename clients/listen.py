"""Print the captions of a stream as they arrive.

    python -m clients.listen --stream ID [--target-lang en] [--url ws://127.0.0.1:8765] [--jsonl]

Subscribing works before the stream starts. Runs until the daemon closes the connection or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import json
import sys
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from clients.ws_stream import DEFAULT_URL, Printer, endpoint


async def run(args) -> int:
    query = {"stream": args.stream, **({"target_lang": args.target_lang} if args.target_lang else {})}
    printer = Printer(args.jsonl)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    async with connect(endpoint(args.url, "/v1/captions") + "?" + urlencode(query), additional_headers=headers) as ws:
        try:
            async for message in ws:
                printer.show(json.loads(message))
        except ConnectionClosed:
            pass
    if ws.close_code not in (1000, 1001):
        print(f"connection closed: {ws.close_code} {ws.close_reason}".rstrip(), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.listen", description=__doc__.split("\n")[0])
    parser.add_argument("--stream", required=True, help="stream id to follow")
    parser.add_argument("--target-lang", default=None, help="only captions in this language")
    parser.add_argument("--token", default=os.environ.get("STREAMSED_TOKEN"),
                        help="access token, when the daemon has auth_tokens (default: $STREAMSED_TOKEN)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"daemon address (default {DEFAULT_URL})")
    parser.add_argument("--jsonl", action="store_true", help="print every event as a JSON line")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (OSError, InvalidStatus) as error:  # InvalidStatus: e.g. 401, a wrong token
        print(f"listen: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
