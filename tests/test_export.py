"""Caption export over HTTP: GET /v1/streams/ID/captions.vtt|.srt|.jsonl, checked with a real WebVTT
parser (webvtt-py), for injected finals (several targets, a re-ingested stream) and for the finals a
real ingest connection produced with the tiny random Whisper."""

import asyncio
import html
import io
import json

import numpy as np
import pytest
import webvtt
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamsed.daemon.config import load_config, with_overrides
from streamsed.daemon.server import Daemon
from streamsed.daemon.web_routes import export_rows
from streamsed.engine.loading import engine_from_model
from tests.browser import cues_per_segment, http_get
from tests.speech import espeak, silence
from tests.tiny_models import NO_GUARD, tiny_whisper


@pytest.fixture(scope="module")
def engine():
    model, extractor, tokenizer = tiny_whisper()
    return engine_from_model(model, extractor, tokenizer, name="tiny-whisper", device="cpu")


@pytest.fixture
async def daemon(engine):
    daemon = Daemon(with_overrides(load_config(env={}), server={"port": 0}, guard=NO_GUARD), engine)
    await daemon.start()
    await daemon.wait_ready()
    yield daemon
    await daemon.stop()


def final(segment, target, text, start, end, stream="talk", source="de"):
    return {"type": "final", "stream": stream, "segment": segment, "source_lang": source, "target_lang": target,
            "text": text, "start": start, "end": end, "latency_ms": 100}


# Two ingest sessions of one stream, German captions + English translation: the second session's
# segment numbers and times start again at 0.
FINALS = [
    final(0, "de", "Guten Morgen.", 0.5, 1.75), final(0, "en", "Good morning.", 0.5, 1.75),
    final(1, "de", "Wie geht's? <gut> & -->", 2.25, 4.0), final(1, "en", "How are you?\nFine & <well>", 2.25, 4.0),
    final(0, "de", "Noch einmal.", 0.25, 1.5), final(0, "en", "Once more.", 0.25, 1.5),
    final(1, "de", "Tschüss.", 1.75, 2.125), final(1, "en", "Bye.", 1.75, 2.125),
]


async def get(daemon, path, **headers):
    status, response_headers, body = await http_get(f"http://127.0.0.1:{daemon.port}{path}", headers)
    return status, response_headers, body.decode()


def test_rows_number_on_across_re_ingests():
    rows = export_rows(FINALS)
    assert [r["segment"] for r in rows] == [0, 1, 2, 3]
    assert [r["target_lang"] for r in rows] == ["de"] * 4  # default: the first target seen
    assert [(r["start"], r["end"]) for r in rows] == [(0.5, 1.75), (2.25, 4.0), (4.25, 5.5), (5.75, 6.125)]
    english = export_rows(FINALS, "en")
    assert [r["text"] for r in english] == ["Good morning.", "How are you?\nFine & <well>", "Once more.", "Bye."]
    assert set(english[0]) == {"segment", "start", "end", "source_lang", "target_lang", "text"}  # translate's jsonl
    assert export_rows([]) == [] and export_rows(FINALS, "fr") == []


def test_rows_with_detected_languages_and_tricky_restarts():
    # Transcription with the language detected per utterance: one final per segment, languages vary.
    detected = [final(0, "en", "Hello.", 0.5, 1.0, source="en"), final(1, "de", "Hallo.", 1.5, 2.0, source="de"),
                final(2, "en", "Bye.", 2.5, 3.0, source="en")]
    assert [r["text"] for r in export_rows(detected)] == ["Hello.", "Hallo.", "Bye."]
    assert [r["text"] for r in export_rows(detected, "de")] == ["Hallo."]
    # A one-utterance session followed by a new session: segment 0 twice, told apart by its times...
    again = [final(0, "en", "One.", 0.5, 1.0), final(0, "de", "Zwei.", 0.25, 2.0), final(1, "de", "Drei.", 2.5, 3.0)]
    assert [(r["segment"], r["start"], r["text"]) for r in export_rows(again)] == [
        (0, 0.5, "One."), (1, 1.25, "Zwei."), (2, 3.5, "Drei.")]
    # ... or, with the very same times, by a second final in one language.
    same = [final(0, "en", "One.", 0.5, 1.0), final(0, "en", "Two.", 0.5, 1.0)]
    assert [(r["segment"], r["start"], r["end"]) for r in export_rows(same)] == [(0, 0.5, 1.0), (1, 1.5, 2.0)]
    # Cue ids are the same utterance's in every language, even when one language misses a final.
    gap = [final(0, "de", "A.", 0.5, 1.0), final(1, "de", "B.", 1.5, 2.0), final(1, "en", "B.", 1.5, 2.0)]
    assert [r["segment"] for r in export_rows(gap, "en")] == [1]


async def test_vtt_srt_jsonl_exports(daemon):
    for event in FINALS:
        daemon.hub.publish(event)
    daemon.hub.publish(final(0, "en", "other stream", 0.0, 1.0, stream="elsewhere"))

    status, headers, text = await get(daemon, "/v1/streams/talk/captions.vtt?target_lang=en")
    assert status == 200 and headers["Content-Type"] == "text/vtt; charset=utf-8"
    assert headers["Content-Disposition"] == 'inline; filename="talk.en.vtt"'
    cues = webvtt.from_string(text, strict=True).captions
    rows = export_rows(FINALS, "en")
    assert [c.identifier for c in cues] == ["0-0", "1-0", "2-0", "3-0"]  # stable cue ids: <segment>-<n>
    assert [(c.start_in_seconds, c.end_in_seconds) for c in cues] == [(0, 1), (2, 4), (4, 5), (5, 6)]
    assert [(c.start, c.end) for c in cues] == [("00:00:00.500", "00:00:01.750"), ("00:00:02.250", "00:00:04.000"),
                                                ("00:00:04.250", "00:00:05.500"), ("00:00:05.750", "00:00:06.125")]
    assert [html.unescape(c.text) for c in cues] == [" ".join(r["text"].split()) for r in rows]  # laid out anew
    assert "-->" not in text.split("\n\n", 2)[2].replace(" --> ", "")  # escaped inside cue text

    status, headers, default = await get(daemon, "/v1/streams/talk/captions.vtt")
    assert status == 200 and "Guten Morgen." in default and "Good morning." not in default  # first target
    assert headers["Content-Disposition"] == 'inline; filename="talk.vtt"'

    status, headers, srt = await get(daemon, "/v1/streams/talk/captions.srt?target_lang=en")
    assert status == 200 and headers["Content-Type"] == "application/x-subrip; charset=utf-8"
    cues = webvtt.from_buffer(io.StringIO(srt), format="srt").captions
    assert [c.raw_text for c in cues] == [" ".join(r["text"].split()) for r in rows]  # SRT has no escaping
    assert srt.startswith("1\n00:00:00,500 --> 00:00:01,750\nGood morning.\n")  # SRT counters start at 1

    status, headers, jsonl = await get(daemon, "/v1/streams/talk/captions.jsonl?target_lang=de")
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson; charset=utf-8"
    assert [json.loads(line) for line in jsonl.splitlines()] == export_rows(FINALS, "de")

    status, _, listing = await get(daemon, "/v1/streams")
    assert status == 200 and json.loads(listing) == {"streams": [
        {"stream": "elsewhere", "live": False, "finals": 1, "targets": ["en"]},
        {"stream": "talk", "live": False, "finals": 8, "targets": ["de", "en"]},
    ]}


@pytest.mark.parametrize("path, status, fragment", [
    ("/v1/streams/nobody/captions.vtt", 404, "no stream 'nobody'"),
    ("/v1/streams/bad%20id/captions.srt", 404, "stream ids are"),
    ("/v1/streams/talk/captions.vtt?target_lang=fr", 404, "its target languages: de, en"),
    ("/v1/streams/talk/captions.vtt?target_lang=english!", 400, "not an ISO 639 code"),
    ("/v1/streams/talk/captions.vtt?lang=en", 400, "unknown query parameter 'lang'"),
    ("/v1/streams/talk/captions.txt", 404, "not found; endpoints"),
    ("/v1/streams/talk/captions", 404, "not found; endpoints"),
])
async def test_export_errors(daemon, path, status, fragment):
    for event in FINALS:
        daemon.hub.publish(event)
    got, headers, text = await get(daemon, path)
    assert got == status and fragment in text and headers["Content-Type"].startswith("text/plain")


async def test_a_live_stream_without_finals_exports_an_empty_file(daemon):
    async with connect(f"{daemon.url}/v1/stream") as ws:
        await ws.send(json.dumps({"type": "start", "stream": "quiet"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        status, _, text = await get(daemon, "/v1/streams/quiet/captions.vtt")
        assert (status, text) == (200, "WEBVTT\n")
        status, _, text = await get(daemon, "/v1/streams/quiet/captions.jsonl")
        assert (status, text) == (200, "")
        status, _, listing = await get(daemon, "/v1/streams")
        assert {"stream": "quiet", "live": True, "finals": 0, "targets": []} in json.loads(listing)["streams"]


async def test_export_matches_the_finals_of_a_real_session(daemon):
    audio = np.concatenate([silence(0.3), espeak("Hello everyone.", "en", 140), silence(1.0),
                            espeak("Thank you for coming.", "en", 140), silence(1.0)])
    data = (audio * 32767).astype("<i2").tobytes()
    async with connect(f"{daemon.url}/v1/stream?stream=real:1") as ws:
        await ws.send(json.dumps({"type": "start", "source_lang": "de", "targets": ["de", "en"]}))
        for first in range(0, len(data), 3200):
            await ws.send(data[first: first + 3200])
        await ws.send(json.dumps({"type": "stop"}))
        events = []
        async with asyncio.timeout(60):
            try:
                while True:
                    events.append(json.loads(await ws.recv()))
            except ConnectionClosed:
                pass
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 4
    for target in ("de", "en"):
        mine = [f for f in finals if f["target_lang"] == target and f["text"].strip()]  # blank cues are left out
        status, _, text = await get(daemon, f"/v1/streams/real%3A1/captions.vtt?target_lang={target}")
        assert status == 200
        cues = webvtt.from_string(text, strict=True).captions  # long finals are several cues
        assert cues_per_segment(cues) == [(str(f["segment"]), " ".join(f["text"].split()), format_vtt(f["start"]),
                                           format_vtt(f["end"])) for f in mine]


def format_vtt(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
