"""Protocol v1 without sockets or a model: messages, start options, events; and the captions hub."""

import asyncio
import json
import re
from pathlib import Path

import pytest

from streamsed.core.protocol import (
    ERRORS,
    ProtocolError,
    caption_filter,
    close_reason,
    error_event,
    parse_client_message,
    split_path,
    start_options,
)
from streamsed.daemon.captions_hub import CaptionsHub, Listener
from streamsed.daemon.config import StreamingConfig

DEFAULTS = StreamingConfig()


def code_of(call, *args):
    with pytest.raises(ProtocolError) as error:
        call(*args)
    return error.value.code


def test_client_messages():
    assert parse_client_message('{"type":"keepalive"}') == {"type": "keepalive"}
    assert parse_client_message('{"type":"stop"}')["type"] == "stop"
    assert code_of(parse_client_message, "{not json") == "bad_json"
    assert code_of(parse_client_message, "[1, 2]") == "bad_json"
    assert code_of(parse_client_message, '{"type":"dance"}') == "unknown_type"
    assert code_of(parse_client_message, '{"stream":"x"}') == "unknown_type"


def test_recoverable_and_fatal_codes():
    assert not ProtocolError("bad_json", "x").fatal and not ProtocolError("bad_audio", "x").fatal
    assert ProtocolError("unsupported_encoding", "x").close_code == 1008
    assert ProtocolError("too_many_sessions", "x").close_code == 1013
    assert ProtocolError("internal", "x").close_code == 1011
    assert ProtocolError("bad_option", "m").event() == {"type": "error", "code": "bad_option", "message": "m"}
    assert error_event("bad_json", "m")["type"] == "error"
    with pytest.raises(ValueError):
        ProtocolError("no_such_code", "x")
    assert {close for close, _ in ERRORS.values()} == {None, 1008, 1011, 1013}


def test_start_defaults_come_from_config():
    options = start_options({}, None, DEFAULTS)
    assert options.stream.startswith("s-") and len(options.stream) > 4
    assert (options.sample_rate, options.encoding, options.source_lang, options.targets) == (
        16000, "pcm_s16le", None, [None])
    assert start_options({}, None, DEFAULTS).stream != options.stream
    configured = StreamingConfig(source_lang="de", targets=["de", "en"], sample_rate=48000, encoding="pcm_f32le")
    options = start_options({}, None, configured)
    assert (options.sample_rate, options.encoding, options.source_lang, options.targets) == (
        48000, "pcm_f32le", "de", ["de", "en"])


def test_message_overrides_query_overrides_defaults():
    path, query = split_path("/v1/stream?stream=room1&targets=de,en&sample_rate=22050&source_lang=DE")
    assert path == "/v1/stream"
    options = start_options(query, None, DEFAULTS)
    assert (options.stream, options.targets, options.sample_rate, options.source_lang) == (
        "room1", ["de", "en"], 22050, "de")
    message = {"type": "start", "stream": "room2", "targets": ["en"], "sample_rate": 44100, "encoding": "pcm_f32le"}
    options = start_options(query, message, DEFAULTS)
    assert (options.stream, options.targets, options.sample_rate, options.encoding, options.source_lang) == (
        "room2", ["en"], 44100, "pcm_f32le", "de")
    assert start_options({}, {"type": "start", "source_lang": "auto", "targets": []}, DEFAULTS).source_lang is None


@pytest.mark.parametrize("query, message, code", [
    ({}, {"encoding": "mp3"}, "unsupported_encoding"),
    ({"encoding": "opus"}, None, "unsupported_encoding"),
    ({}, {"sample_rate": 4000}, "bad_sample_rate"),
    ({}, {"sample_rate": 500000}, "bad_sample_rate"),
    ({"sample_rate": "fast"}, None, "bad_sample_rate"),
    ({}, {"sample_rate": True}, "bad_sample_rate"),
    ({}, {"source_lang": "german!"}, "unsupported_language"),
    ({"targets": "en,xx-yy"}, None, "unsupported_language"),
    ({}, {"targets": [1]}, "bad_option"),
    ({}, {"source_lang": 5}, "bad_option"),
    ({}, {"stream": "has space"}, "bad_option"),
    ({}, {"stream": 7}, "bad_option"),
    ({}, {"rate": 16000}, "bad_option"),
    ({"sample-rate": "16000"}, None, "bad_option"),
    ({}, {"prompt": ["a"]}, "bad_option"),
    ({}, {"hotwords": "x" * 2001}, "bad_option"),
])
def test_bad_start_options(query, message, code):
    message = {"type": "start", **message} if message is not None else None
    error = pytest.raises(ProtocolError, start_options, query, message, DEFAULTS).value
    assert error.code == code and error.fatal


def test_prompt_and_hotwords_become_one_context_hotwords_first():
    assert start_options({}, None, DEFAULTS).prompt is None
    assert start_options({"prompt": "  "}, None, DEFAULTS).prompt is None
    options = start_options({"hotwords": "Grafana, kubectl"}, {"type": "start", "prompt": " Our cluster. "}, DEFAULTS)
    assert options.prompt == "Grafana, kubectl Our cluster."
    assert start_options({"prompt": "Glossary: Aoife"}, None, DEFAULTS).prompt == "Glossary: Aoife"


def test_query_sample_rate_string_and_whole_float():
    assert start_options({"sample_rate": "8000"}, None, DEFAULTS).sample_rate == 8000
    assert start_options({}, {"sample_rate": 16000.0}, DEFAULTS).sample_rate == 16000


def test_caption_filter():
    assert caption_filter(split_path("/v1/captions?stream=room1&target_lang=EN")[1]) == ("room1", "en")
    assert caption_filter({"stream": "room1"}) == ("room1", None)
    assert code_of(caption_filter, {}) == "bad_option"
    assert code_of(caption_filter, {"stream": "a", "lang": "en"}) == "bad_option"
    assert code_of(caption_filter, {"stream": "a", "target_lang": "english"}) == "unsupported_language"


def test_close_reason_fits_a_close_frame():
    assert close_reason("bad_option", "short") == "bad_option: short"
    long = close_reason("bad_option", "ü" * 200)
    assert len(long.encode()) <= 123 and long.endswith("...")


# -- captions hub ---------------------------------------------------------------------------------
def partial(n, lang="en", stream="s"):
    return {"type": "partial", "stream": stream, "segment": n, "target_lang": lang, "stable": "", "unstable": str(n)}


def final(n, lang="en", stream="s"):
    return {"type": "final", "stream": stream, "segment": n, "target_lang": lang, "text": str(n)}


def drain(listener: Listener) -> list[dict]:
    return [listener._queue.popleft() for _ in range(len(listener))]


async def test_fan_out_filters_by_stream_and_target():
    hub = CaptionsHub(queue_size=8)
    everything, german, other = hub.subscribe("s"), hub.subscribe("s", "de"), hub.subscribe("t")
    hub.publish({"type": "speech_start", "stream": "s", "segment": 0, "start": 0.0})  # not a caption
    hub.publish(partial(0, "de"))
    hub.publish(final(0, "de"))
    hub.publish(final(0, "en"))
    assert [e["type"] for e in drain(everything)] == ["partial", "final", "final"]
    assert [(e["type"], e["target_lang"]) for e in drain(german)] == [("partial", "de"), ("final", "de")]
    assert drain(other) == []


async def test_full_queue_drops_partials_first_and_never_finals():
    hub = CaptionsHub(queue_size=3)
    slow = hub.subscribe("s")
    for event in (partial(0), partial(1), final(0), partial(2)):
        hub.publish(event)
    # partial 0 was evicted for partial 2
    assert [(e["type"], e["segment"]) for e in slow._queue] == [("partial", 1), ("final", 0), ("partial", 2)]
    for n in range(1, 6):
        hub.publish(final(n))
    assert [e["type"] for e in slow._queue] == ["final"] * 6  # grew past queue_size for finals only
    hub.publish(partial(9))  # no room and no partial to evict: the new partial is dropped
    assert [e["segment"] for e in drain(slow)] == [0, 1, 2, 3, 4, 5]
    assert slow.dropped_partials == 4


async def test_slow_listener_does_not_hold_up_others():
    hub = CaptionsHub(queue_size=2)
    slow, fast = hub.subscribe("s"), hub.subscribe("s")
    received = []

    async def read(listener):
        while (event := await listener.get()) is not None:
            received.append(event["segment"])

    reader = asyncio.create_task(read(fast))
    for n in range(50):
        hub.publish(final(n))  # never awaits: a listener cannot block the publisher
        await asyncio.sleep(0)
    hub.close_all()
    await asyncio.wait_for(reader, 1)
    assert received == list(range(50))
    assert len(slow) == 50  # all finals kept for the slow one


async def test_subscribe_before_stream_and_unsubscribe():
    hub = CaptionsHub()
    early = hub.subscribe("later")
    waiter = asyncio.create_task(early.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish(final(0, stream="later"))
    assert (await asyncio.wait_for(waiter, 1))["text"] == "0"
    hub.unsubscribe(early)
    assert hub.listeners("later") == [] and await early.get() is None
    hub.publish(final(1, stream="later"))  # nobody left: nothing happens


def test_stream_claims():
    hub = CaptionsHub()
    assert hub.claim("a") and not hub.claim("a") and hub.claim("b")
    hub.release("a")
    assert hub.claim("a")


def test_events_are_json_serializable():
    json.dumps([partial(0), final(0), error_event("bad_json", "x")])


def test_docs_list_every_error_code_with_its_close_code():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| (-|\d{4}) \|", doc, re.MULTILINE))
    assert documented == {code: str(close) if close else "-" for code, (close, _) in ERRORS.items()}


def test_hub_keeps_finals_of_a_bounded_number_of_streams(monkeypatch):
    from streamsed.daemon import captions_hub

    monkeypatch.setattr(captions_hub, "MAX_STREAMS_KEPT", 3)
    hub = captions_hub.CaptionsHub()
    assert hub.claim("live")
    final = lambda stream, n: {"type": "final", "stream": stream, "segment": n, "target_lang": "en", "text": f"t{n}"}
    hub.publish(final("live", 0))
    for i, stream in enumerate(["a", "b", "c"]):
        hub.publish(final(stream, i))
    assert hub.finals("live") == [final("live", 0)]  # a live stream is never evicted
    assert hub.finals("a") == []  # the least recently active idle stream went
    assert [f["text"] for f in hub.finals("c")] == ["t2"]
    hub.publish(final("b", 5))
    hub.publish(final("d", 6))
    assert hub.finals("c") == [] and len(hub.finals("b")) == 2
