"""Stream a WAV file to a streamsed daemon and print its partials and finals.

    python -m clients.ws_stream speech.wav [--url ws://127.0.0.1:8765] [--stream ID]
        [--source-lang de] [--targets de,en] [--realtime | --fast] [--chunk-ms 100] [--jsonl]

The file is sent at its own sample rate (declared in ``start``) as pcm_s16le, at real-time pace by
default. After the last chunk the client sends ``stop`` and waits for the server to close; the exit
status is 0 when it closed normally (1000), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from urllib.parse import urlsplit

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

DEFAULT_URL = "ws://127.0.0.1:8765"


class Printer:
    """Events as JSON lines, or for people: finals one per line, partials on one rewritten TTY line."""

    def __init__(self, jsonl: bool, out=None, err=None):
        self.jsonl, self.out, self.err = jsonl, out or sys.stdout, err or sys.stderr
        self.tty = self.out.isatty()
        self._partial_shown = False

    def show(self, event: dict) -> None:
        if self.jsonl:
            print(json.dumps(event, ensure_ascii=False), file=self.out, flush=True)
            return
        kind = event.get("type")
        if kind == "partial":
            text = " ".join(t for t in (event["stable"], event["unstable"]) if t)
            line = f"~ {event['segment']} [{event['target_lang']}] {text}"
            if self.tty:
                self.out.write("\r\033[K" + line)
                self._partial_shown = True
            else:
                print(line, file=self.out)
        elif kind == "final":
            self._clear()
            print(f"{event['segment']} [{event['start']:.2f}-{event['end']:.2f}] [{event['target_lang']}] "
                  f"{event['text']}  ({event['latency_ms']} ms)", file=self.out)
        elif kind == "error":
            self._clear()
            print(f"error {event['code']}: {event['message']}", file=self.err)
        elif kind in ("ready", "subscribed"):
            details = ", ".join(f"{k}={v}" for k, v in event.items() if k != "type")
            print(f"{kind}: {details}", file=self.err)
        self.out.flush()

    def _clear(self) -> None:
        if self._partial_shown:
            self.out.write("\r\033[K")
            self._partial_shown = False


def endpoint(url: str, path: str) -> str:
    """``ws://host:port`` -> ``ws://host:port/v1/...``; a URL with a path is used as given."""
    return url if urlsplit(url).path not in ("", "/") else url.rstrip("/") + path


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """int16 mono samples at the file's own rate (channels are averaged)."""
    samples, rate = sf.read(path, dtype="int16", always_2d=True)
    if samples.shape[1] > 1:
        print(f"{path}: mixing {samples.shape[1]} channels down to mono", file=sys.stderr)
    return samples.mean(axis=1).round().astype("<i2"), rate


async def send_audio(ws, samples: np.ndarray, rate: int, chunk_ms: int, realtime: bool) -> None:
    step = max(1, rate * chunk_ms // 1000)
    started = time.monotonic()
    for index, first in enumerate(range(0, len(samples), step)):
        if realtime:
            await asyncio.sleep(max(0.0, started + index * step / rate - time.monotonic()))
        await ws.send(samples[first: first + step].tobytes())
    await ws.send(json.dumps({"type": "stop"}))


async def run(args) -> int:
    samples, rate = read_wav(args.file)
    printer = Printer(args.jsonl)
    start = {"type": "start", "sample_rate": rate, "encoding": "pcm_s16le"}
    if args.stream:
        start["stream"] = args.stream
    if args.source_lang:
        start["source_lang"] = args.source_lang
    if args.targets:
        start["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    async with connect(endpoint(args.url, "/v1/stream"), compression=None, additional_headers=headers) as ws:
        await ws.send(json.dumps(start))
        sender = None
        try:
            async for message in ws:
                event = json.loads(message)
                printer.show(event)
                if event.get("type") == "ready" and sender is None:
                    sender = asyncio.create_task(send_audio(ws, samples, rate, args.chunk_ms, not args.fast))
        except ConnectionClosed:
            pass
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    if ws.close_code != 1000:
        print(f"connection closed: {ws.close_code} {ws.close_reason}".rstrip(), file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients.ws_stream", description=__doc__.split("\n")[0])
    parser.add_argument("file", help="WAV (or any libsndfile format), mono or mixed down, any sample rate")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"daemon address (default {DEFAULT_URL})")
    parser.add_argument("--stream", default=None, help="stream id (default: the server makes one)")
    parser.add_argument("--token", default=os.environ.get("STREAMSED_TOKEN"),
                        help="access token, when the daemon has auth_tokens (default: $STREAMSED_TOKEN)")
    parser.add_argument("--source-lang", default=None, help="spoken language, e.g. de")
    parser.add_argument("--targets", default=None, help="output languages, comma-separated, e.g. de,en")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", help="send at real-time pace (default)")
    pace.add_argument("--fast", action="store_true", help="send as fast as possible")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per websocket frame (default 100)")
    parser.add_argument("--jsonl", action="store_true", help="print every server event as a JSON line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.chunk_ms <= 0:
        build_parser().error("--chunk-ms must be positive")
    try:
        return asyncio.run(run(args))
    except (OSError, sf.LibsndfileError, InvalidStatus) as error:  # InvalidStatus: e.g. 401, a wrong token
        print(f"ws_stream: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
