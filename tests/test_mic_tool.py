"""`streamsed mic`: the terminal UI's rendering, caption files, and the tool run for real: capture
from the virtual ALSA microphone, under a real terminal (tmux) for the screen a user sees, with
the engine in-process (--local) or a daemon (--server)."""

import asyncio
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamsed.cli import mic as mic_tool
from streamsed.cli.mic import DIM, RESET, CaptionLog, TerminalUI, meter
from tests import virtual_mic
from tests.speech import espeak, silence, words
from tests.tiny_models import NO_GUARD, NO_GUARD_ENV
from tests.virtual_mic import VirtualMic

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    return ANSI.sub("", text)


# -- rendering ------------------------------------------------------------------------------------
@pytest.fixture
def ui(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    ui = TerminalUI(out, tty=True)
    ui.start()
    return ui


def partial(segment, stable, unstable, lang="en"):
    return {"type": "partial", "stream": "mic", "segment": segment, "target_lang": lang, "stable": stable,
            "unstable": unstable, "start": 0.5}


def final(segment, text, start=0.5, end=2.0, lang="en"):
    return {"type": "final", "stream": "mic", "segment": segment, "source_lang": "en", "target_lang": lang,
            "text": text, "start": start, "end": end, "latency_ms": 100}


def test_meter():
    assert plain(meter(-96)) == "▕" + "░" * 24 + "▏  -96 dB"
    assert plain(meter(-30)) == "▕" + "█" * 12 + "░" * 12 + "▏  -30 dB"
    assert plain(meter(0.0)) == "▕" + "█" * 24 + "▏    0 dB"
    assert "\x1b[32m" in meter(-30) and "\x1b[33m" in meter(-12) and "\x1b[31m" in meter(-3)  # green/yellow/red
    assert meter(-30, color=False) == plain(meter(-30))


def test_live_area_shows_level_and_partial_with_a_dim_unstable_tail(ui):
    ui.level(-30)
    ui.show({"type": "speech_start", "stream": "mic", "segment": 0, "start": 0.5})
    ui.show(partial(0, "Hello every", "one here"))
    lines = ui.live_lines()
    assert len(lines) == 2
    assert plain(lines[0]).startswith("● ▕" + "█" * 12) and "-30 dB" in lines[0]
    assert lines[1] == f"  Hello every {DIM}one here{RESET}"  # committed text plain, the tail dim
    screen = ui.out.getvalue()
    assert "\x1b[?25l" in screen  # the cursor is hidden while the live area is redrawn


def test_final_scrolls_up_and_replaces_its_partial(ui):
    ui.show(partial(0, "Hello", "every one"))
    ui.out.truncate(0)
    ui.out.seek(0)
    ui.show(final(0, "Hello everyone.", start=61.5))
    written = ui.out.getvalue()
    # The live area is cleared, the final printed as a line, then the live area drawn below it.
    assert written.startswith("\x1b[1A\r\x1b[J")
    assert f"{DIM}01:01{RESET} Hello everyone.\n" in written
    assert len(ui.live_lines()) == 1 and not ui.partials
    ui.show(partial(0, "late", "partial"))  # a partial of a finalized segment is stale
    assert not ui.partials
    ui.show(partial(1, "", "Next"))
    assert ui.live_lines()[1] == f"  {DIM}Next{RESET}"


def test_a_long_partial_keeps_its_end_in_view(ui):
    ui.show(partial(0, "one two three four five six seven eight nine ten eleven twelve", "thirteen fourteen"))
    line = plain(ui.live_lines()[1])
    assert len(line) == 57 and line.endswith("twelve thirteen fourteen") and line.startswith("  …")


def test_without_a_terminal_only_finals_are_printed():
    out, err = io.StringIO(), io.StringIO()
    ui = TerminalUI(out, tty=False, err=err, show_lang=True)
    ui.start()
    ui.level(-20)
    ui.show(partial(0, "Hallo", "zusammen", lang="de"))
    ui.show(final(0, "Hallo zusammen.", lang="de"))
    ui.show(final(0, "Hello everyone.", lang="en"))
    ui.show(final(1, "  ", lang="en"))  # blank finals show nothing
    ui.set_status("microphone lost: gone; retrying")
    ui.close()
    assert out.getvalue() == "[00:00] [de] Hallo zusammen.\n[00:00] [en] Hello everyone.\n"
    assert err.getvalue() == "microphone lost: gone; retrying\n"


def test_caption_log_numbers_segments_across_sessions_and_saves(tmp_path):
    log = CaptionLog()
    log.add(final(0, "Hello everyone.", 0.5, 2.0), session=0, offset=0.0)
    log.add(partial(1, "x", "y"), session=0, offset=0.0)  # only finals are kept
    log.add(final(1, "Thank you.", 3.0, 4.0), session=0, offset=0.0)
    log.add(final(0, "We are back.", 1.0, 2.5), session=1, offset=30.0)  # the device came back
    assert log.save(tmp_path / "c.vtt") == 3
    assert (tmp_path / "c.vtt").read_text() == (
        "WEBVTT\n\n0-0\n00:00:00.500 --> 00:00:02.000\nHello everyone.\n\n"
        "1-0\n00:00:03.000 --> 00:00:04.000\nThank you.\n\n2-0\n00:00:31.000 --> 00:00:32.500\nWe are back.\n"
    )
    log.save(tmp_path / "c.srt")
    assert (tmp_path / "c.srt").read_text().startswith("1\n00:00:00,500 --> 00:00:02,000\nHello everyone.\n\n2\n")
    log.save(tmp_path / "c.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert rows[2] == {"segment": 2, "start": 31.0, "end": 32.5, "source_lang": "en", "target_lang": "en",
                       "text": "We are back."}


@pytest.mark.parametrize("args, message", [
    (["--local", "--save", "out.txt"], "--save out.txt: the file name must end in .vtt, .srt or .jsonl"),
    (["--local", "--save", "out.srt", "--target-lang", "en,de"], ".srt takes one target language; use .jsonl"),
    (["--local", "--save", "/nonexistent/out.vtt"], "folder /nonexistent does not exist"),
    (["--local", "--target-lang", "english"], "target language 'english' is not an ISO 639 code"),
    (["--local", "--block-ms", "5"], "--block-ms must be 10-1000"),
    (["--server", "http://x:1"], "--server must be a ws:// or wss:// URL"),
])
def test_bad_options_are_one_line_errors(args, message, capsys, monkeypatch):
    from streamsed.cli import main

    monkeypatch.setattr(mic_tool, "find_device", lambda spec: None)  # no microphone needed for these
    assert main(["mic", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamsed: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_mode_is_required(capsys):
    from streamsed.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["mic"])
    assert exit_.value.code == 2 and "one of the arguments --server --local is required" in capsys.readouterr().err


# -- the tool for real ------------------------------------------------------------------------------
@pytest.fixture
def vmic(tmp_path):
    reason = virtual_mic.available()
    if reason:
        pytest.skip(reason)
    mic = VirtualMic(tmp_path / "alsa")
    mic.plug()
    yield mic
    mic.cleanup()


class Tmux:
    """A real terminal (tmux) running one command; ``screen()`` is what a user would see."""

    def __init__(self, width=100, height=30):
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed")
        self.folder = tempfile.mkdtemp(prefix="streamsed-tmux-")  # short: a socket path has a length limit
        self.socket = os.path.join(self.folder, "socket")
        self.width, self.height = width, height

    def tmux(self, *args, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-S", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True,
                              check=check)

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        command = shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *argv])
        self.tmux("new-session", "-d", "-x", str(self.width), "-y", str(self.height),
                  f"cd {shlex.quote(str(ROOT))} && {command}; echo EXIT=$?; sleep 600")

    def screen(self, escapes: bool = False) -> str:
        """The visible screen (with ``escapes``: with the SGR sequences of its styled text)."""
        args = ["capture-pane", "-p", "-t", "0"] + (["-e"] if escapes else [])
        return self.tmux(*args).stdout

    def wait_for(self, predicate, timeout: float, escapes: bool = False, every: float = 0.15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(escapes)
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never matched within {timeout} s:\n{screen}")
            time.sleep(every)

    def ctrl_c(self) -> None:
        self.tmux("send-keys", "-t", "0", "C-c")

    def close(self) -> None:
        self.tmux("kill-server", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def terminal():
    term = Tmux(width=160)
    yield term
    term.close()


METER = re.compile(r"[●○] ▕[█░ ]{24}▏ +-?\d+ dB")
FINAL_LINE = re.compile(r"^(\d\d:\d\d) (\S.*)$", re.MULTILINE)


def test_tool_in_a_terminal_with_the_local_engine(vmic, terminal, tmp_path, tiny_model_dir):
    """The screen: a level meter, finals scrolling up; Ctrl-C finalizes the open utterance and saves."""
    save = tmp_path / "captions.vtt"
    terminal.start([sys.executable, "-m", "streamsed", "mic", "--local", "--model", str(tiny_model_dir),
                    "--device", "cpu", "--save", str(save)], {**vmic.env, **NO_GUARD_ENV})
    terminal.wait_for(lambda s: "listening to [0] vmic (44100 Hz, mono)" in s, 60)
    screen = terminal.wait_for(lambda s: METER.search(s), 10)
    assert "○ ▕" + "░" * 24 + "▏  -96 dB" in screen  # silence so far
    vmic.play(np.concatenate([espeak("Hello everyone.", "en", 140), silence(1.2),
                              espeak("Thank you for coming to the meeting today.", "en", 130)]))
    # Speech moves the meter ...
    screen = terminal.wait_for(lambda s: (m := re.search(r"▕[█░]{24}▏ +(-?\d+) dB", s)) and int(m[1]) > -40, 30)
    # ... the first utterance's final scrolls up above the live area ...
    screen = terminal.wait_for(lambda s: FINAL_LINE.search(s), 60)
    lines = screen.rstrip().splitlines()
    final_row = next(i for i, line in enumerate(lines) if FINAL_LINE.match(line))
    meter_row = next(i for i, line in enumerate(lines) if METER.search(line))
    assert final_row < meter_row
    # ... and Ctrl-C during the second one ends it: its final too, then the file.
    vmic.wait_played(60, before_end_s=1.0)
    before = terminal.screen()
    terminal.ctrl_c()
    screen = terminal.wait_for(lambda s: "EXIT=" in s, 60)
    assert len(FINAL_LINE.findall(before)) == 1  # the second utterance was still open
    assert "EXIT=0" in screen and "saved 2 captions to" in screen, screen
    assert len(FINAL_LINE.findall(screen)) == 2 and not METER.search(screen)  # the live area is gone
    cues = save.read_text().split("\n\n")
    ids = [c.splitlines()[0] for c in cues[1:]]  # a long (tiny-model) final is several cues: <segment>-<n>
    assert cues[0] == "WEBVTT" and sorted({i.split("-")[0] for i in ids}) == ["0", "1"] and ids[0] == "0-0"


def test_a_second_ctrl_c_quits_at_once(vmic, tmp_path):
    """The first Ctrl-C waits for the open utterance's final; a second one does not wait."""
    save = tmp_path / "captions.srt"

    async def scenario():
        daemon = await tiny_daemon(decode_delay=1.5)  # finals take a while
        try:
            tool = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamsed", "mic", "--server", daemon.url, "--save", str(save), cwd=ROOT,
                env={**os.environ, **vmic.env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            async with asyncio.timeout(60):
                while not daemon.sessions:
                    await asyncio.sleep(0.05)
            vmic.play(espeak("Thank you for coming to the meeting today, we have a lot to talk about.", "en", 130))
            await asyncio.to_thread(vmic.wait_played, 60, 1.0)  # the utterance is open
            tool.send_signal(signal.SIGINT)
            await asyncio.sleep(0.3)
            tool.send_signal(signal.SIGINT)
            started = time.monotonic()
            out, err = await asyncio.wait_for(tool.communicate(), 30)
            return tool.returncode, time.monotonic() - started, err.decode()
        finally:
            await daemon.stop()

    code, seconds, err = asyncio.run(scenario())
    assert code == 130 and seconds < 1.0, (code, seconds, err)
    assert "saved 0 captions to" in err and save.read_text() == ""  # what there was, kept


async def tiny_daemon(decode_delay: float = 0.0):
    from streamsed.daemon.config import load_config, with_overrides
    from streamsed.daemon.server import Daemon
    from streamsed.engine.loading import engine_from_model
    from tests.tiny_models import tiny_whisper

    model, extractor, tokenizer = tiny_whisper()
    engine = engine_from_model(model, extractor, tokenizer, name="tiny-whisper", device="cpu")
    if decode_delay:
        decode = engine.decode

        def slow_decode(*args, **kwargs):
            time.sleep(decode_delay)
            return decode(*args, **kwargs)

        engine.decode = slow_decode
    # The delay is patched into this engine object; a second lane would decode on an unpatched replica.
    lanes = {"lanes": 1} if decode_delay else {}
    daemon = Daemon(with_overrides(load_config(env={}), server={"port": 0}, guard=NO_GUARD, model=lanes), engine)
    await daemon.start()
    await daemon.wait_ready()
    return daemon


def test_tool_streams_to_a_daemon(vmic, tmp_path):
    """--server: the microphone becomes a daemon stream; the tool prints and saves its finals."""
    from websockets.asyncio.client import connect

    save = tmp_path / "captions.jsonl"

    async def scenario():
        daemon = await tiny_daemon()
        try:
            listener = await connect(f"{daemon.url}/v1/captions?stream=desk")
            tool = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamsed", "mic", "--server", daemon.url, "--stream", "desk", "--save",
                str(save), "--duration", "120", cwd=ROOT, env={**os.environ, **vmic.env},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            vmic.play(np.concatenate([espeak("Hello everyone.", "en", 140), silence(1.2),
                                      espeak("Thank you for coming.", "en", 140), silence(1.2)]))
            heard = []
            async with asyncio.timeout(90):
                while len([e for e in heard if e["type"] == "final"]) < 2:
                    heard.append(json.loads(await listener.recv()))
            tool.send_signal(signal.SIGINT)  # what Ctrl-C does
            out, err = await asyncio.wait_for(tool.communicate(), 60)
            await listener.close()
            return tool.returncode, out.decode(), err.decode(), heard
        finally:
            await daemon.stop()

    code, out, err, heard = asyncio.run(scenario())
    assert code == 0, err
    assert "listening to [0] vmic (44100 Hz, mono) -> tiny-whisper at ws://" in err
    saved = [json.loads(line) for line in save.read_text().splitlines()]
    finals = [e for e in heard if e["type"] == "final"]
    assert [r["segment"] for r in saved] == [0, 1] and [r["text"] for r in saved] == [f["text"] for f in finals]
    assert [f["stream"] for f in finals] == ["desk", "desk"]
    # Not a terminal: just the finals, one per line.
    assert out.splitlines() == [f"[{mic_tool.clock(f['start'])}] {f['text']}" for f in finals]


def test_unreachable_daemon_is_a_one_line_error(vmic):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "streamsed", "mic", "--server", f"ws://127.0.0.1:{port}"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, **vmic.env}, timeout=60)
    assert result.returncode == 2
    assert f"streamsed: error: cannot reach the daemon at ws://127.0.0.1:{port}/v1/stream" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_live_captions_of_real_speech_in_a_terminal(vmic, terminal, tmp_path):
    """whisper-base in-process: the right text on screen and in captions.vtt, the unstable tail of a
    partial styled differently from its committed text, and Ctrl-C finalizing the open utterance."""
    from tests.test_daemon_e2e import FIRST, SECOND

    third = "The next item on the agenda is the budget for the coming year, and then we will discuss the new office."
    save = tmp_path / "captions.vtt"
    terminal.start([sys.executable, "-m", "streamsed", "mic", "--local", "--device", "cpu", "--save", str(save)],
                   vmic.env)
    terminal.wait_for(lambda s: "listening to [0] vmic (44100 Hz, mono) -> whisper-base on cpu" in s, 300)
    vmic.play(np.concatenate([espeak(FIRST, "en", 130), silence(1.5), espeak(SECOND, "en", 130), silence(1.5),
                              espeak(third, "en", 130)]))
    before_ctrl_c = {}

    def interrupt():  # Ctrl-C two seconds before the end of the third sentence: it is still open
        vmic.wait_played(300, before_end_s=2.0)
        before_ctrl_c["screen"] = terminal.screen()
        terminal.ctrl_c()

    interrupter = threading.Thread(target=interrupt, daemon=True)
    interrupter.start()
    # Watch the screen as a user would, until the tool has exited.
    styled, meters, screens = [], set(), []
    dim_tail = re.compile(r"^  ([A-Za-z][^\x1b]*?) ?\x1b\[(?:[0-9;]*;)?2(?:;[0-9;]*)?m([^\x1b]+)")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        screen = terminal.screen(escapes=True)
        screens.append(screen)
        for line in screen.splitlines():
            if match := dim_tail.match(line):  # a partial: committed text plain, the unstable tail dim
                styled.append(match.groups())
            if match := re.search(r"▕[^▏]*▏ +(-?\d+) dB", plain(line)):
                meters.add(int(match[1]))
        if "EXIT=" in screen:
            break
        time.sleep(0.15)
    interrupter.join(10)
    screen = plain(screens[-1])
    texts = [m[2] for m in FINAL_LINE.finditer(screen)]
    assert "EXIT=0" in screen and f"saved {len(texts)} captions to" in screen, screen
    assert styled, "no partial with a dim unstable tail was ever on screen"
    assert all(committed.strip() and tail.strip() for committed, tail in styled)
    assert -96 in meters and max(meters) > -40  # the meter showed silence, then speech

    print("partials (committed | dim tail):", styled[:3], "finals:", texts)
    # A long sentence may be one or two finals (a pause inside it can close a segment), so the words
    # are compared, not the number of finals.
    assert words(texts[0]) == words(FIRST) and words(texts[1]) == words(SECOND), texts
    # The open utterance was finalized by Ctrl-C: the words spoken until then.
    spoken = [w for text in texts[2:] for w in words(text)]
    assert spoken[:4] == words(third)[:4] and len(spoken) < len(words(third)), texts
    assert len(FINAL_LINE.findall(before_ctrl_c["screen"])) < len(texts)  # one utterance was still open
    cues = [cue.splitlines() for cue in save.read_text().split("\n\n")[1:]]
    assert [cue[0] for cue in cues] == [f"{n}-0" for n in range(len(texts))]
    assert [words(" ".join(cue[2:])) for cue in cues] == [words(text) for text in texts]  # a cue may have 2 lines
