"""The issue's browser scenario with the real default model: `streamsed serve` (whisper-base) in a
subprocess, headless Chromium playing espeak-ng speech as its microphone into the speaker page,
the same final on the speaker page and on a viewer in a second tab, and the exported WebVTT equal
to those finals."""

import json

import numpy as np
import pytest
import soundfile as sf
import soxr
import webvtt

from tests.browser import (DaemonProcess, PageErrors, WebSocketLog, artifact, chromium, cues_per_segment, http_get,
                           requires_chromium)
from tests.speech import RATE, espeak, silence, words

pytestmark = [pytest.mark.slow, requires_chromium]
SENTENCE = "Hello everyone, welcome to the meeting."


@pytest.fixture(scope="module")
def server():
    server = DaemonProcess()
    yield server
    assert server.stop() == 0, server.process.stderr.read()


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory):
    """48 kHz 16-bit mono like a recorder's: speech, then silence so the utterance closes (Chromium loops it)."""
    audio = np.concatenate([silence(1.0), espeak(SENTENCE, "en", 140), silence(3.0)])
    path = tmp_path_factory.mktemp("mic") / "meeting48k.wav"
    sf.write(path, soxr.resample(audio, RATE, 48000), 48000, subtype="PCM_16")
    return path


async def state(page, expected, timeout=30_000):
    await page.wait_for_function("s => document.body.dataset.state === s", arg=expected, timeout=timeout)


async def test_speaker_page_to_viewer_tab_and_export(server, microphone_wav):
    stream = "browser-e2e"
    async with chromium(microphone=microphone_wav) as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 720})
        viewer = await context.new_page()
        viewer_errors = PageErrors(viewer)
        await viewer.goto(f"{server.http}/captions?stream={stream}&lines=3")
        await state(viewer, "idle")

        speaker = await context.new_page()
        speaker_errors = PageErrors(speaker)
        sockets = WebSocketLog(speaker)
        await speaker.goto(f"{server.http}/speak?stream={stream}&source_lang=en")
        await speaker.click("#start")
        await state(speaker, "live")
        rate = int(await speaker.evaluate("document.body.dataset.sampleRate"))
        assert sockets.sent_text[0] == {"type": "start", "stream": stream, "sample_rate": rate,
                                        "encoding": "pcm_s16le", "source_lang": "en"}
        ready = sockets.events("ready")[0]
        assert ready["sample_rate"] == rate and ready["model"] == "whisper-base"

        # The first utterance's final, on the speaker page ...
        final = speaker.locator('.line.final[data-segment="0"] .text')
        await final.wait_for(timeout=180_000)
        spoken = await final.inner_text()
        assert words(spoken) == words(SENTENCE), spoken
        assert sockets.events("final")[0]["text"] == spoken
        # ... and on the viewer in the other tab.
        shown = viewer.locator('.line.final[data-segment="0"] .text')
        await shown.wait_for(timeout=30_000)
        assert await shown.inner_text() == spoken
        assert float(await speaker.locator("#meter").get_attribute("data-max")) > -30
        await viewer.bring_to_front()
        await viewer.screenshot(path=artifact("viewer-whisper-base.png"))
        await speaker.bring_to_front()
        await speaker.screenshot(path=artifact("speak-whisper-base.png"))

        await speaker.click("#stop")
        await state(speaker, "stopped", timeout=120_000)  # the daemon sent the last finals, then closed
        finals = sockets.events("final")
        assert finals and all(f["stream"] == stream for f in finals)
        viewer_errors.check()
        speaker_errors.check()

    status, headers, body = await http_get(f"{server.http}/v1/streams/{stream}/captions.vtt")
    assert status == 200 and headers["Content-Type"] == "text/vtt; charset=utf-8"
    cues = webvtt.from_string(body.decode(), strict=True).captions
    kept = [f for f in finals if f["text"].strip()]
    assert cues_per_segment(cues) == [(str(f["segment"]), " ".join(f["text"].split()), vtt_time(f["start"]),
                                       vtt_time(f["end"])) for f in kept]  # a long final is several cues
    status, _, body = await http_get(f"{server.http}/v1/streams/{stream}/captions.jsonl")
    assert [json.loads(line)["text"] for line in body.decode().splitlines()] == [f["text"] for f in finals]


def vtt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
