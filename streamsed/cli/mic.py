"""``streamsed mic``: live captions of this computer's microphone, in the terminal.

    streamsed mic --local [--input-device NAME|INDEX] [--source-lang de] [--target-lang en] [--save out.vtt]
    streamsed mic --server ws://127.0.0.1:8765 [--stream desk] [...]

``--local`` runs the engine in this process (an ``EngineWorker`` and a ``StreamSession`` fed
straight from the microphone, no sockets); ``--server`` streams the microphone to a running daemon
(protocol v1, ``/v1/stream``) and shows what it sends back.

On a terminal the screen shows finals as lines that scroll up, and at the bottom a live area: a
level meter (RMS dBFS) with a speech indicator, and the open utterance's partial with its committed
part in normal text and its unstable tail dimmed. Without a terminal (or with ``--plain``) only the
finals are printed, one per line. Ctrl-C (or SIGTERM, or ``--duration``) stops the capture, finalizes
the open utterance, prints its final and writes ``--save`` (.vtt, .srt or .jsonl) before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from ..core.captions import SegmentResult, format_results
from ..core.languages import parse_language
from ..daemon.microphone import Audio, Lost, Microphone, MicrophoneError, Opened, Unavailable, find_device

log = logging.getLogger(__name__)

SAVE_FORMATS = {".vtt": "vtt", ".srt": "srt", ".jsonl": "jsonl"}
METER_WIDTH = 24
METER_FLOOR_DB = -60.0
REDRAW_INTERVAL_S = 0.05

# ANSI styles (SGR). The unstable tail of a partial is dim; finals and committed text are not.
RESET, BOLD, DIM = "\033[0m", "\033[1m", "\033[2m"
RED, GREEN, YELLOW, CYAN = "\033[31m", "\033[32m", "\033[33m", "\033[36m"
CLEAR_TO_END, HIDE_CURSOR, SHOW_CURSOR = "\033[J", "\033[?25l", "\033[?25h"


class ToolError(Exception):
    """Ends the tool with a one-line ``streamsed: error: ...`` (exit status 2), e.g. no daemon there."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--server", metavar="URL", help="stream to a running daemon, e.g. ws://127.0.0.1:8765")
    mode.add_argument("--local", action="store_true", help="run the model in this process (no daemon needed)")
    parser.add_argument(
        "--input-device", "-i", default=None, metavar="NAME|INDEX",
        help="microphone: a name (or a unique part of it) or an index from `streamsed devices` "
             "(default: [microphone] device of --config, else the system default input)",
    )
    parser.add_argument("--sample-rate", type=int, default=None, help="capture rate in Hz (default: the device's own)")
    parser.add_argument("--block-ms", type=int, default=None, help="audio per capture block in ms (default 100)")
    parser.add_argument("--source-lang", default=None, help="spoken language, e.g. de (default: the model's)")
    parser.add_argument("--target-lang", default=None,
                        help="output language(s), comma-separated, e.g. en (default: same as source = transcribe)")
    parser.add_argument("--stream", default=None, help="stream id on the daemon (--server; default: the daemon picks)")
    parser.add_argument("--save", metavar="FILE", default=None,
                        help="on exit, write the captions to FILE: .vtt, .srt or .jsonl")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this long, as Ctrl-C does")
    parser.add_argument("--plain", action="store_true",
                        help="print finals as plain lines, no live area (the default when stdout is not a terminal)")
    parser.add_argument("--config", default=None,
                        help="TOML settings: [microphone], [vad], [streaming] chunk_ms and, with --local, [model]")
    parser.add_argument("--model", default=None, help="model reference with --local (default: whisper-base)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="compute device with --local")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "int8"])


# -- the terminal UI ------------------------------------------------------------------------------
def meter(db: float, width: int = METER_WIDTH, color: bool = True) -> str:
    """A level bar from METER_FLOOR_DB to 0 dBFS, e.g. ``▕██████░░░░░░▏  -23 dB``."""
    filled = round(width * min(1.0, max(0.0, (db - METER_FLOOR_DB) / -METER_FLOOR_DB)))
    bar = "█" * filled + "░" * (width - filled)
    if color:
        tint = RED if db > -6 else YELLOW if db > -20 else GREEN
        bar = f"{tint}{'█' * filled}{RESET}{DIM}{'░' * (width - filled)}{RESET}"
    return f"▕{bar}▏ {max(db, -99):4.0f} dB"


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


@dataclass
class _Partial:
    segment: int
    stable: str
    unstable: str


class TerminalUI:
    """Renders caption events; see the module doc. ``tty=False`` prints finals only."""

    def __init__(self, out: TextIO, *, tty: bool, err: TextIO | None = None, show_lang: bool = False):
        self.out, self.err, self.tty, self.show_lang = out, err or sys.stderr, tty, show_lang
        self.level_db: float | None = None
        self.speaking = False
        self.status = ""
        self.status_style = DIM
        self.partials: dict[str | None, _Partial] = {}
        self.last_final: dict[str | None, int] = {}
        self.offset = 0.0  # seconds added to event times (a re-opened device starts a new session)
        self._live_lines = 0
        self._drawn_at = 0.0
        self._started = False

    # -- events
    def _slot(self, event: dict) -> str | None:
        """One live line per requested target. With one target all events share a line: when the source
        language is detected per utterance, a transcript's target_lang can change from one partial to the next."""
        return event.get("target_lang") if self.show_lang else None

    def show(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "partial":
            target = self._slot(event)
            if event["segment"] <= self.last_final.get(target, -1):
                return
            self.partials[target] = _Partial(event["segment"], event.get("stable", ""), event.get("unstable", ""))
            self.redraw(force=True)
        elif kind == "final":
            target = self._slot(event)
            self.last_final[target] = max(event["segment"], self.last_final.get(target, -1))
            partial = self.partials.get(target)
            if partial is not None and partial.segment <= event["segment"]:
                del self.partials[target]
            self.print_final(event)
        elif kind == "speech_start":
            self.speaking = True
            self.redraw(force=True)
        elif kind == "speech_end":
            self.speaking = False
            self.redraw(force=True)
        elif kind == "error":
            self.message(f"error {event.get('code')}: {event.get('message')}", RED)

    def print_final(self, event: dict) -> None:
        text = event.get("text", "").strip()
        if not text:
            return
        start = clock(self.offset + event["start"])
        lang = f"[{event.get('target_lang')}] " if self.show_lang else ""
        if not self.tty:
            print(f"[{start}] {lang}{text}", file=self.out, flush=True)
            return
        self._write_above(f"{DIM}{start}{RESET} {CYAN if lang else ''}{lang}{RESET if lang else ''}{text}")

    def message(self, text: str, style: str = YELLOW) -> None:
        """A line above the live area (stderr without a terminal)."""
        if not self.tty:
            print(text, file=self.err, flush=True)
            return
        self._write_above(f"{style}{text}{RESET}")

    def new_session(self, offset: float) -> None:
        """A (re-)opened device starts a new session: segment numbers and times restart."""
        self.offset = offset
        self.partials.clear()
        self.last_final.clear()
        self.speaking = False

    def level(self, db: float) -> None:
        self.level_db = db
        self.redraw()

    def set_status(self, text: str, style: str = DIM) -> None:
        self.status, self.status_style = text, style
        if not self.tty and text:
            print(text, file=self.err, flush=True)
        self.redraw(force=True)

    # -- drawing
    def start(self) -> None:
        if self.tty and not self._started:
            self.out.write(HIDE_CURSOR)
            self._started = True
        self.redraw(force=True)

    def close(self) -> None:
        """Leave the screen as text: the live area is cleared, the cursor shown again."""
        if self.tty:
            self._clear_live()
            self.out.write(SHOW_CURSOR)
            self.out.flush()

    def _width(self) -> int:
        # Live lines must never wrap (the redraw moves up one row per line). Three columns to spare:
        # the terminal echoes "^C" after the last one when Ctrl-C is pressed.
        return max(20, shutil.get_terminal_size((80, 24)).columns - 3)

    def live_lines(self) -> list[str]:
        width = self._width()
        dot = f"{RED}●{RESET}" if self.speaking else f"{DIM}○{RESET}"
        level = meter(self.level_db) if self.level_db is not None else f"▕{' ' * METER_WIDTH}▏   -- dB"
        status = self.status
        room = width - (2 + METER_WIDTH + 10) - 2
        if len(status) > room:
            status = status[: max(0, room - 1)] + "…"
        lines = [f"{dot} {level}  {self.status_style}{status}{RESET}"]
        for target, partial in self.partials.items():
            lang = f"[{target}] " if self.show_lang else ""
            stable, unstable = partial.stable, partial.unstable
            joined = " " if stable and unstable else ""
            room = width - len(lang) - 2
            visible = len(stable) + len(joined) + len(unstable)
            if visible > room:  # keep the end of the utterance in view
                cut = visible - room + 1
                if cut >= len(stable) + len(joined):
                    unstable, stable, joined = unstable[cut - len(stable) - len(joined):], "", ""
                else:
                    stable = stable[cut:]
                stable = "…" + stable if stable else stable
                unstable = unstable if stable else "…" + unstable
            lines.append(f"  {lang}{stable}{joined}{DIM}{unstable}{RESET}")
        return lines

    def redraw(self, force: bool = False) -> None:
        if not self.tty or not self._started:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < REDRAW_INTERVAL_S:
            return
        self._drawn_at = now
        self._clear_live()
        lines = self.live_lines()
        self.out.write("\n".join(lines))
        self._live_lines = len(lines)
        self.out.flush()

    def _clear_live(self) -> None:
        if self._live_lines > 1:
            self.out.write(f"\033[{self._live_lines - 1}A")
        self.out.write("\r" + CLEAR_TO_END)
        self._live_lines = 0

    def _write_above(self, line: str) -> None:
        self._clear_live()
        self.out.write(line + "\n")
        if self._started:
            self.redraw(force=True)
        else:
            self.out.flush()


class _UILogHandler(logging.Handler):
    """Warnings and errors as lines above the live area, so they do not tear the screen."""

    def __init__(self, ui: TerminalUI):
        super().__init__(logging.WARNING)
        self.ui = ui

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ui.message(f"{record.levelname.lower()}: {record.getMessage()}",
                            RED if record.levelno >= logging.ERROR else YELLOW)
        except Exception:
            self.handleError(record)


# -- captions kept for --save ---------------------------------------------------------------------
@dataclass
class CaptionLog:
    results: list[SegmentResult] = field(default_factory=list)
    _numbers: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, event: dict, session: int, offset: float) -> None:
        """Keep a final; segments are renumbered across sessions (a re-opened device restarts at 0)."""
        if event.get("type") != "final":
            return
        number = self._numbers.setdefault((session, event["segment"]), len(self._numbers))
        self.results.append(SegmentResult(
            segment=number, start=round(offset + event["start"], 3), end=round(offset + event["end"], 3),
            source_lang=event.get("source_lang"), target_lang=event.get("target_lang"), text=event.get("text", ""),
        ))

    def save(self, path: Path) -> int:
        fmt = SAVE_FORMATS[path.suffix.lower()]
        path.write_text(format_results(self.results, fmt), encoding="utf-8")
        return len({r.segment for r in self.results if r.text.strip()})


# -- back ends: the engine in this process, or a daemon -------------------------------------------
class LocalBackend:
    def __init__(self, settings: ToolSettings, emit):
        self.settings, self.emit = settings, emit
        self.engine = self.worker = self.session = None

    @property
    def description(self) -> str:
        return f"{self.engine.name} on {self.engine.device} (in this process)"

    async def prepare(self) -> None:
        from ..core.languages import resolve_targets
        from ..engine.loading import load_engine
        from ..engine.worker import EngineWorker

        model = self.settings.model
        self.engine = await asyncio.to_thread(load_engine, model.name, model.device, model.dtype, model.window_margin_s,
                                          model.cuda_graphs)
        resolve_targets(self.engine, self.settings.source_lang, self.settings.targets)  # UnsupportedTarget
        self.worker = await asyncio.to_thread(  # off the loop: lanes copy the model's modules
            lambda: EngineWorker(self.engine, model.max_batch_utterances, final_window=model.final_window,
                                 partial_window=model.partial_window, final_deadline_ms=model.final_deadline_ms,
                                 lanes=model.lanes, partial_dtype=model.partial_dtype))
        self.worker.start()

    async def open(self, opened: Opened) -> None:
        from ..daemon.session import SessionOptions, StreamSession

        options = SessionOptions(stream=self.settings.stream or "mic", sample_rate=opened.sample_rate,
                                 encoding="pcm_s16le", source_lang=self.settings.source_lang,
                                 targets=list(self.settings.targets))
        self.session = StreamSession(options, self.worker, self.engine, self.emit,
                                     vad_config=self.settings.vad, chunk_ms=self.settings.chunk_ms,
                                     guard=self.settings.guard)

    async def feed(self, data: bytes) -> None:
        if self.session is not None:
            await self.session.feed(data)

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.finish()

    async def shutdown(self) -> None:
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)


class ServerBackend:
    def __init__(self, settings: ToolSettings, emit, on_failure):
        self.settings, self.emit, self.on_failure = settings, emit, on_failure
        self.url = settings.server.rstrip("/")
        self.ws = None
        self.reader: asyncio.Task | None = None
        self.model = "?"
        self._stopping = False

    @property
    def description(self) -> str:
        return f"{self.model} at {self.url}"

    def endpoint(self) -> str:
        return self.url if urlsplit(self.url).path not in ("", "/") else self.url + "/v1/stream"

    async def prepare(self) -> None:
        pass  # the connection opens with the device (a re-opened device gets a new session)

    async def open(self, opened: Opened) -> None:
        from websockets.asyncio.client import connect

        start = {"type": "start", "sample_rate": opened.sample_rate, "encoding": "pcm_s16le",
                 "targets": [t for t in self.settings.targets if t]}
        if self.settings.stream:
            start["stream"] = self.settings.stream
        if self.settings.source_lang:
            start["source_lang"] = self.settings.source_lang
        try:
            self.ws = await connect(self.endpoint(), compression=None, open_timeout=10)
            await self.ws.send(json.dumps(start))
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        except (OSError, TimeoutError) as error:
            raise ToolError(f"cannot reach the daemon at {self.endpoint()}: {error}") from None
        except Exception as error:  # ConnectionClosed, InvalidStatus, InvalidURI ...
            raise ToolError(f"the daemon at {self.endpoint()} refused the stream: {error}") from None
        if reply.get("type") != "ready":
            raise ToolError(f"the daemon refused the stream: {reply.get('code')}: {reply.get('message')}")
        self.model = reply.get("model", "?")
        self._stopping = False
        self.reader = asyncio.create_task(self._read(self.ws))

    async def _read(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in ws:
                self.emit(json.loads(message))
        except ConnectionClosed:
            pass
        if not self._stopping:
            self.on_failure(f"the daemon closed the connection ({ws.close_code} {ws.close_reason})".strip())

    async def feed(self, data: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        if self.ws is None:
            return
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            pass  # the reader reports it

    async def close(self) -> None:
        """Send stop and wait for the remaining finals (the daemon closes with 1000 after them)."""
        from websockets.exceptions import ConnectionClosed

        ws, self.ws = self.ws, None
        if ws is None:
            return
        self._stopping = True
        try:
            await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), 120)
        except TimeoutError:
            log.warning("the daemon did not send the last finals within 120 s")
        await ws.close()

    async def shutdown(self) -> None:
        await self.close()


# -- the tool -------------------------------------------------------------------------------------
@dataclass
class ToolSettings:
    server: str | None
    device: str | None
    sample_rate: int
    block_ms: int
    queue_blocks: int
    retry_s: float
    stream: str | None
    source_lang: str | None
    targets: list[str | None]
    save: Path | None
    duration: float | None
    model: object  # ModelConfig
    vad: object  # VadConfig
    chunk_ms: int
    guard: object = None  # GuardConfig (None: the defaults)


def settings_from(args) -> ToolSettings:
    """Flags over --config over defaults; raises UserError-worthy ValueErrors with the flag named."""
    from ..daemon.config import load_config, with_overrides

    config = load_config(args.config)
    model = with_overrides(config, model={k: v for k, v in (("name", args.model), ("device", args.device),
                                                           ("dtype", args.dtype)) if v is not None}).model
    mic = config.microphone
    source = parse_language(args.source_lang if args.source_lang is not None
                            else (mic.source_lang or config.streaming.source_lang or None), "source")
    if args.target_lang is not None:
        targets = [parse_language(t, "target") for t in args.target_lang.split(",") if t.strip()]
    else:
        targets = [parse_language(t, "target") for t in (mic.targets or config.streaming.targets)]
    save = Path(args.save) if args.save else None
    if save is not None:
        if save.suffix.lower() not in SAVE_FORMATS:
            raise ValueError(f"--save {save}: the file name must end in .vtt, .srt or .jsonl")
        if save.suffix.lower() in (".vtt", ".srt") and len(targets) > 1:
            raise ValueError(f"--save {save}: {save.suffix} takes one target language; use .jsonl for several")
        if not save.parent.is_dir():
            raise ValueError(f"--save {save}: folder {save.parent} does not exist")
    rate = args.sample_rate if args.sample_rate is not None else mic.sample_rate
    if rate and not 8000 <= rate <= 192000:
        raise ValueError(f"--sample-rate must be 8000-192000 Hz, got {rate}")
    block_ms = args.block_ms if args.block_ms is not None else mic.block_ms
    if not 10 <= block_ms <= 1000:
        raise ValueError(f"--block-ms must be 10-1000, got {block_ms}")
    if args.duration is not None and args.duration <= 0:
        raise ValueError("--duration must be positive")
    if args.server is not None and urlsplit(args.server).scheme not in ("ws", "wss"):
        raise ValueError(f"--server must be a ws:// or wss:// URL, got {args.server!r}")
    return ToolSettings(
        server=args.server, device=args.input_device if args.input_device is not None else (mic.device or None),
        sample_rate=rate, block_ms=block_ms, queue_blocks=mic.queue_blocks, retry_s=mic.retry_s,
        stream=args.stream, source_lang=source, targets=targets or [None], save=save, duration=args.duration,
        model=model, vad=config.vad, chunk_ms=config.streaming.chunk_ms, guard=config.guard,
    )


class MicTool:
    def __init__(self, settings: ToolSettings, ui: TerminalUI, microphone: Microphone | None = None):
        self.settings, self.ui = settings, ui
        self.captions = CaptionLog()
        self.microphone = microphone or Microphone(
            settings.device, sample_rate=settings.sample_rate, block_ms=settings.block_ms,
            queue_blocks=settings.queue_blocks, retry_s=settings.retry_s,
        )
        self.stop_requested = asyncio.Event()
        self.failure: str | None = None
        self.sessions_opened = 0  # sessions the back end accepted (nothing to save without one)
        self.session_number = -1
        self.first_open: float | None = None
        if settings.server:
            self.backend = ServerBackend(settings, self.handle, self.fail)
        else:
            self.backend = LocalBackend(settings, self.handle)

    def handle(self, event: dict) -> None:
        self.ui.show(event)
        self.captions.add(event, self.session_number, self.ui.offset)

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.stop_requested.set()

    def request_stop(self) -> None:
        if not self.stop_requested.is_set():
            self.ui.set_status("finishing the open utterance… (Ctrl-C again to quit at once)", YELLOW)
        self.stop_requested.set()

    async def run(self) -> int:
        settings, ui = self.settings, self.ui
        # Fail fast on a wrong device name, before the (slow) model load.
        await asyncio.to_thread(find_device, settings.device)
        ui.start()
        ui.set_status("loading the model…" if not settings.server else "connecting…")
        await self.backend.prepare()
        capture = asyncio.create_task(self._capture())
        stopper = asyncio.create_task(self.stop_requested.wait())
        timer = None
        if settings.duration is not None:
            timer = asyncio.get_running_loop().call_later(settings.duration, self.stop_requested.set)
        try:
            await asyncio.wait({capture, stopper}, return_when=asyncio.FIRST_COMPLETED)
            self.microphone.close()
            await capture  # drains the last blocks, then finalizes (or raises the capture's error)
        finally:
            stopper.cancel()
            if timer is not None:
                timer.cancel()
            self.microphone.close()
            if not capture.done():
                capture.cancel()
            await self.backend.shutdown()
        if self.failure:
            ui.message(self.failure, RED)
            return 1
        return 0

    async def _capture(self) -> None:
        ui, backend = self.ui, self.backend
        async with contextlib.aclosing(self.microphone.events(retry_initial=False)) as events:
            async for event in events:
                if isinstance(event, Audio):
                    ui.level(event.level_dbfs)
                    await backend.feed(event.data)
                elif isinstance(event, Opened):
                    now = time.monotonic()
                    self.first_open = self.first_open or now
                    ui.new_session(now - self.first_open)
                    self.session_number += 1
                    await backend.open(event)
                    self.sessions_opened += 1
                    channels = "stereo mixed to mono" if event.channels == 2 else "mono"
                    if self.session_number == 0:
                        ui.message(f"listening to {event.device.label} ({event.sample_rate} Hz, {channels}) -> "
                                   f"{backend.description}; Ctrl-C to stop", DIM)
                    else:
                        ui.message(f"microphone {event.device.label} is back", GREEN)
                    ui.set_status("")
                elif isinstance(event, Lost):
                    ui.level_db = None
                    ui.set_status(f"microphone lost: {event.reason}; retrying", RED)
                    await backend.close()
                elif isinstance(event, Unavailable):
                    ui.set_status(f"microphone unavailable, retrying every {event.retry_s:g} s: {event.reason}", RED)
        await backend.close()


def run(args) -> int:
    """``streamsed mic``: returns the exit status; user errors raise cli.UserError."""
    from ..core.errors import UserError
    from ..core.languages import UnsupportedTarget
    from ..daemon.config import ConfigError

    try:
        settings = settings_from(args)
    except (ConfigError, ValueError) as error:
        raise UserError(str(error)) from None
    tty = sys.stdout.isatty() and not args.plain
    ui = TerminalUI(sys.stdout, tty=tty, show_lang=len(settings.targets) > 1)
    handler, root = None, logging.getLogger()
    saved_handlers = list(root.handlers)
    if tty:  # log lines go through the UI so they do not tear the live area
        handler = _UILogHandler(ui)
        root.handlers = [handler]
    status = 0
    try:
        status = asyncio.run(_main(settings, ui))
    except (MicrophoneError, ToolError, UnsupportedTarget) as error:
        ui.close()
        raise UserError(str(error)) from None
    except KeyboardInterrupt:
        status = 130
    finally:
        ui.close()
        if handler is not None:
            root.handlers = saved_handlers
    return status


async def _main(settings: ToolSettings, ui: TerminalUI) -> int:
    tool = MicTool(settings, ui)
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            tool.request_stop()
            return
        # A second Ctrl-C: quit at once, keeping the captions so far; the engine thread, a decode in
        # flight and the audio stream are left to the operating system.
        _save(tool, settings)
        ui.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        status = await tool.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        _save(tool, settings)
    return status


def _save(tool: MicTool, settings: ToolSettings) -> None:
    if settings.save is None or not tool.sessions_opened:  # an error before any captioning started
        return
    count = tool.captions.save(settings.save)
    tool.ui.close()
    print(f"saved {count} caption{'s' if count != 1 else ''} to {settings.save}", file=sys.stderr, flush=True)
