"""StreamSession: live audio in, protocol v1 events out; finals equal the offline pipeline.

The fast tests drive the mechanics with the tiny random Whisper (meaningless but deterministic text,
which is all that "final == offline output" needs). The slow ones use the real default model.
"""

import asyncio
import time

import numpy as np
import pytest

from streamsed.core.audio import AudioError, StreamResampler, pcm_to_float32
from streamsed.core.guard import GuardConfig
from streamsed.core.languages import Target, UnsupportedTarget
from streamsed.core.segments import segment_audio
from streamsed.core.vad import samples_to_seconds
from streamsed.daemon.session import DECODE_FAILED, SessionOptions, StreamSession
from streamsed.engine.loading import engine_from_model, load_engine
from streamsed.engine.worker import EngineWorker
from tests.speech import espeak, silence, words
from tests.tiny_models import tiny_whisper

ENGLISH = [("Hello everyone.", 1.5), ("Thank you for coming to the meeting today.", 1.0)]
GERMAN = [("Guten Morgen. Wie geht es dir?", 1.2), ("Ich habe heute keine Zeit.", 0.0)]  # ends mid-utterance
CHUNK_S = 0.1


def speech(phrases, voice):
    parts = [silence(0.4)]
    for text, pause in phrases:
        clip = espeak(text, voice, 150)
        if not pause:  # cut espeak's own trailing silence: the audio ends inside the utterance
            clip = clip[: np.flatnonzero(np.abs(clip) > 0.01)[-1] + 1]
        parts += [clip, silence(pause)]
    return np.concatenate(parts)


def to_s16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def chunks(data: bytes, bytes_per_chunk: int):
    return [data[i : i + bytes_per_chunk] for i in range(0, len(data), bytes_per_chunk)]


@pytest.fixture(scope="module")
def english():
    return speech(ENGLISH, "en")


@pytest.fixture(scope="module")
def german():
    return speech(GERMAN, "de")


@pytest.fixture(scope="module")
def tiny_engine():
    return engine_from_model(*tiny_whisper(), device="cpu")


@pytest.fixture
async def tiny_worker(tiny_engine):
    worker = EngineWorker(tiny_engine)
    worker.start()
    yield worker
    worker.stop()


QUIET = GuardConfig(enabled=False)  # tiny-model text loops; see tests.tiny_models.NO_GUARD


async def stream_pcm(session, pcm: bytes, bytes_per_chunk: int, pace=None):
    """Feed ``pcm`` chunk by chunk; ``pace`` is awaited after each chunk (None: no pause at all)."""
    for piece in chunks(pcm, bytes_per_chunk):
        await session.feed(piece)
        if pace is not None:
            await pace()
    await session.finish()


def offline_finals(engine, audio, targets, window="exact"):
    """What ``streamsed translate --window W`` produces: (segment, start, end, target_lang, text) rows."""
    rows = []
    for segment in segment_audio(engine, audio):
        for hypothesis in engine.transcribe([segment.audio], targets, window=window)[0]:
            rows.append((segment.segment, round(samples_to_seconds(segment.start), 3),
                         round(samples_to_seconds(segment.end), 3), hypothesis.target.target_lang, hypothesis.text))
    return rows


def live_finals(events):
    return [(e["segment"], e["start"], e["end"], e["target_lang"], e["text"]) for e in events if e["type"] == "final"]


def check_event_order(events, stream, target_langs):
    """The protocol's ordering promises, for one stream."""
    assert all(e["stream"] == stream for e in events if e["type"] != "error")
    starts = [e for e in events if e["type"] == "speech_start"]
    assert [e["segment"] for e in starts] == list(range(len(starts)))
    position = {}  # (type, segment) -> index of the first such event
    for index, event in enumerate(events):
        position.setdefault((event["type"], event.get("segment")), index)
    finals = [e for e in events if e["type"] == "final"]
    assert [e["segment"] for e in finals] == [s for s in range(len(starts)) for _ in target_langs]
    assert [e["target_lang"] for e in finals] == target_langs * len(starts)
    for start in starts:
        segment = start["segment"]
        end = events[position[("speech_end", segment)]]
        assert position[("speech_start", segment)] < position[("speech_end", segment)] < position[("final", segment)]
        assert end["start"] == start["start"] < end["end"]
        for event in events:
            if event.get("segment") != segment:
                continue
            index = events.index(event)
            if event["type"] == "partial":
                assert position[("speech_start", segment)] < index < position[("final", segment)]
                assert event["start"] == start["start"] and event["target_lang"] in target_langs
            if event["type"] == "final":
                assert (event["start"], event["end"]) == (end["start"], end["end"])
                assert isinstance(event["latency_ms"], int) and event["latency_ms"] >= 0
    check_stable_only_grows(events)


def check_stable_only_grows(events):
    committed = {}
    for event in events:
        if event["type"] == "partial":
            key = (event["segment"], event["target_lang"])
            previous = committed.get(key, "")
            assert event["stable"].startswith(previous), (previous, event["stable"])
            committed[key] = event["stable"]


def partial_segments(events):
    return {e["segment"] for e in events if e["type"] == "partial"}


# -- fast: mechanics on the tiny model -----------------------------------------------------------------
async def test_paced_stream_gives_partials_then_finals_equal_to_offline(tiny_engine, tiny_worker, english):
    events = []
    session = StreamSession(SessionOptions("mic", source_lang="en"), tiny_worker, tiny_engine, events.append,
                            guard=QUIET)
    pcm = to_s16(english)
    await stream_pcm(session, pcm, int(CHUNK_S * 16000) * 2, pace=session.wait_partial)
    check_event_order(events, "mic", ["en"])
    assert live_finals(events) == offline_finals(tiny_engine, pcm_to_float32(pcm), [Target("en", "en")])
    assert partial_segments(events) == {0, 1}
    # A partial is requested every 500 ms of new utterance audio (the first one right at speech_start).
    partials_1 = [e for e in events if e["type"] == "partial" and e["segment"] == 1]
    duration_1 = [e["end"] - e["start"] for e in events if e["type"] == "speech_end" and e["segment"] == 1][0]
    assert abs(len(partials_1) - duration_1 / 0.5) <= 2
    final = next(e for e in events if e["type"] == "final")
    assert final["source_lang"] == "en" and set(final) == {
        "type", "stream", "segment", "source_lang", "target_lang", "text", "start", "end", "latency_ms", "window",
        "queued_ms", "compute_ms", "avg_logprob"}  # no no_speech_prob: the tiny tokenizer has no <|nospeech|>
    assert final["window"] == "exact" and 0 <= final["queued_ms"] <= final["latency_ms"] and final["compute_ms"] > 0
    partial = next(e for e in events if e["type"] == "partial")
    assert set(partial) == {"type", "stream", "segment", "target_lang", "stable", "unstable", "start"}


async def test_unpaced_stream_keeps_every_promise(tiny_engine, tiny_worker, english):
    events = []
    session = StreamSession(SessionOptions("fast", source_lang="en"), tiny_worker, tiny_engine, events.append,
                            guard=QUIET)
    pcm = to_s16(english)
    await stream_pcm(session, pcm, int(CHUNK_S * 16000) * 2)  # as fast as the loop goes
    check_event_order(events, "fast", ["en"])
    assert live_finals(events) == offline_finals(tiny_engine, pcm_to_float32(pcm), [Target("en", "en")])
    assert session.finished
    await session.finish()  # idempotent, emits nothing more
    assert events[-1]["type"] == "final"


async def test_float_input_at_48_khz_is_resampled(tiny_engine, tiny_worker, english):
    events = []
    options = SessionOptions("hifi", sample_rate=48000, encoding="pcm_f32le", source_lang="en")
    session = StreamSession(options, tiny_worker, tiny_engine, events.append,
                            guard=QUIET)
    audio_48k = StreamResampler(16000, 48000).process(english, last=True)
    await stream_pcm(session, audio_48k.astype("<f4").tobytes(), 4800 * 4)  # 100 ms of 48 kHz float32
    # The session's resampler is chunk-invariant, so the offline reference resamples in one go.
    expected = offline_finals(tiny_engine, StreamResampler(48000).process(audio_48k, last=True), [Target("en", "en")])
    check_event_order(events, "hifi", ["en"])
    assert live_finals(events) == expected and len(expected) == 2


async def test_two_targets_share_segments_and_finish_closes_the_open_utterance(tiny_engine, tiny_worker, german):
    events = []
    options = SessionOptions("de", source_lang="de", targets=["de", "en"])
    session = StreamSession(options, tiny_worker, tiny_engine, events.append,
                            guard=QUIET)
    assert session.targets == [Target("de", "de"), Target("de", "en")]
    pcm = to_s16(german)
    for piece in chunks(pcm, 3200):
        await session.feed(piece)
        await session.wait_partial()
    # The audio ends inside the last utterance: it is open until finish().
    kinds = [e["type"] for e in events]
    assert kinds.count("speech_end") >= 1 and kinds.count("speech_start") == kinds.count("speech_end") + 1
    assert events[-1]["type"] in ("partial", "speech_start")
    await session.finish()
    check_event_order(events, "de", ["de", "en"])
    assert live_finals(events) == offline_finals(tiny_engine, pcm_to_float32(pcm), session.targets)
    assert {(e["segment"], e["target_lang"]) for e in events if e["type"] == "partial"} == {
        (0, "de"), (0, "en"), (1, "de"), (1, "en")}


async def test_four_concurrent_streams_are_batched_together(tiny_engine, english):
    worker = EngineWorker(tiny_engine)
    worker.start()
    streams = {f"s{i}": [] for i in range(4)}
    sessions = [StreamSession(SessionOptions(name, source_lang="en"), worker, tiny_engine, events.append,
                            guard=QUIET)
                for name, events in streams.items()]
    pcm = to_s16(english)

    async def run(session):
        for piece in chunks(pcm, 3200):
            await session.feed(piece)
            await asyncio.sleep(0)  # the other streams get their turn, as with real sockets
        await session.finish()

    try:
        await asyncio.gather(*(run(session) for session in sessions))
    finally:
        worker.stop()
    expected = offline_finals(tiny_engine, pcm_to_float32(pcm), [Target("en", "en")])
    for name, events in streams.items():
        check_event_order(events, name, ["en"])
        assert live_finals(events) == expected
    stats = worker.stats
    assert stats.max_encoder_batch > 1 and stats.max_decoder_step_rows > 1
    print(f"\n4 streams: encoder batches {stats.encoder_batches}, decoder rows {stats.decoder_batches}")


async def test_finals_survive_a_vanished_client(tiny_engine, tiny_worker, english):
    """emit failing (socket gone) loses nothing else: finish() still produces every final."""
    finals = []

    def emit(event):
        if event["type"] == "final":
            finals.append(event)
        raise ConnectionError("client went away")

    session = StreamSession(SessionOptions("gone", source_lang="en"), tiny_worker, tiny_engine, emit, guard=QUIET)
    for piece in chunks(to_s16(english), 3200):
        await session.feed(piece)
    await session.finish()
    assert [f["segment"] for f in finals] == [0, 1]


async def test_a_failed_final_becomes_an_error_event_and_later_finals_still_come(tiny_engine, english):
    worker = EngineWorker(tiny_engine)
    worker.start()
    events = []
    session = StreamSession(SessionOptions("x", source_lang="en"), worker, tiny_engine, events.append,
                            guard=QUIET)
    pcm = to_s16(english)
    middle = len(pcm) // 2 // 2 * 2  # within the pause between the two utterances
    await session.feed(pcm[:middle])
    worker.stop()  # segment 0 was queued before; segment 1 cannot be decoded any more
    await session.feed(pcm[middle:])
    await session.finish()
    types = [e["type"] for e in events if e["type"] in ("final", "error")]
    assert types == ["final", "error"]
    assert events[-1]["code"] == DECODE_FAILED and "segment 1" in events[-1]["message"]


async def test_bad_input_is_refused(tiny_engine, tiny_worker):
    def make(**options):
        return StreamSession(SessionOptions("bad", **options), tiny_worker, tiny_engine, lambda e: None, guard=QUIET)

    with pytest.raises(UnsupportedTarget):
        make(source_lang="de", targets=["fr"])  # Whisper translates into English only
    with pytest.raises(UnsupportedTarget):
        make(targets=["english"])
    with pytest.raises(AudioError):
        make(encoding="mp3")
    with pytest.raises(AudioError):
        make(sample_rate=1000)
    session = make()
    with pytest.raises(AudioError):
        await session.feed(b"\x00\x01\x02")  # odd length for 16-bit samples
    floats = make(encoding="pcm_f32le")
    with pytest.raises(AudioError):
        await floats.feed(np.array([0.0, np.nan], dtype="<f4").tobytes())
    await floats.feed(np.zeros(160, dtype="<f4").tobytes())  # the stream is still usable
    await floats.finish()
    with pytest.raises(RuntimeError, match="finished"):
        await floats.feed(b"")
    await session.finish()


# -- slow: the real default model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def whisper_base():
    return load_engine("whisper-base", device="cpu")


@pytest.fixture
async def base_worker(whisper_base):
    worker = EngineWorker(whisper_base)
    worker.start()
    yield worker
    worker.stop()


class Ticker:
    """Measures how late a 10 ms asyncio timer fires while the model works on the worker thread."""

    def __init__(self):
        self.ticks = []
        self._task = None

    async def _run(self):
        while True:
            self.ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    def __enter__(self):
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()

    @property
    def max_gap(self) -> float:
        return float(np.diff(self.ticks).max())


@pytest.mark.slow
async def test_real_model_english_stream(whisper_base, base_worker, english):
    events = []
    session = StreamSession(SessionOptions("en"), base_worker, whisper_base, events.append)
    pcm = to_s16(english)
    started = time.perf_counter()
    with Ticker() as ticker:
        # Paced by the partial in flight, as a real-time client on a busy CPU model would be.
        await stream_pcm(session, pcm, 3200, pace=session.wait_partial)
    elapsed = time.perf_counter() - started
    check_event_order(events, "en", ["en"])
    assert partial_segments(events) == {0, 1}
    finals = live_finals(events)
    assert finals == offline_finals(whisper_base, pcm_to_float32(pcm), [Target("en", "en")])
    assert [words(text) for *_, text in finals] == [words(text) for text, _ in ENGLISH]
    last_partial = [e for e in events if e["type"] == "partial" and e["segment"] == 1][-1]
    assert words(last_partial["stable"])[:2] == ["thank", "you"]
    print(f"\nreal model, paced: {elapsed:.1f} s, worker {base_worker.stats.encoder_batches}, "
          f"max tick gap {ticker.max_gap * 1000:.1f} ms, busiest batch {base_worker.stats.max_batch_seconds:.2f} s")
    assert ticker.max_gap < 0.1 < base_worker.stats.max_batch_seconds


@pytest.mark.slow
async def test_real_model_unpaced_stream_matches_offline(whisper_base, base_worker, english):
    events = []
    session = StreamSession(SessionOptions("burst"), base_worker, whisper_base, events.append)
    pcm = to_s16(english)
    await stream_pcm(session, pcm, 3200)
    check_event_order(events, "burst", ["en"])
    assert live_finals(events) == offline_finals(whisper_base, pcm_to_float32(pcm), [Target("en", "en")])
    # The burst ends before the first partial is back: the finals supersede it (in the queue, or
    # through finish() cancelling it), and no partial is emitted after a final.
    kinds = [e["type"] for e in events]
    assert "partial" not in kinds[kinds.index("final"):]


@pytest.mark.slow
async def test_real_model_german_captions_and_english_translation(whisper_base, base_worker, german):
    events = []
    options = SessionOptions("de", source_lang="de", targets=["de", "en"])
    session = StreamSession(options, base_worker, whisper_base, events.append)
    pcm = to_s16(german)
    await stream_pcm(session, pcm, 3200)  # ends mid-utterance: finish() closes it
    check_event_order(events, "de", ["de", "en"])
    finals = live_finals(events)
    assert finals == offline_finals(whisper_base, pcm_to_float32(pcm), session.targets)
    by_target = {(segment, lang): text for segment, _, _, lang, text in finals}
    assert words(by_target[1, "de"]) == words("Ich habe heute keine Zeit.")
    assert words(by_target[0, "en"])[:2] == ["good", "morning"]


async def test_feed_waits_when_finals_pile_up(tiny_engine):
    """With the model behind, feed() stops returning once MAX_FINALS_IN_FLIGHT finals are pending."""
    from streamsed.daemon.session import MAX_FINALS_IN_FLIGHT

    burst = np.concatenate([silence(0.3)] + [np.concatenate([espeak("Yes.", "en", 150), silence(0.9)])] * 8)
    worker = EngineWorker(tiny_engine, max_new_tokens=4)  # not started yet: no final can complete
    events = []
    session = StreamSession(SessionOptions("flood", source_lang="en"), worker, tiny_engine, events.append,
                            guard=QUIET)
    pieces = chunks(to_s16(burst), int(CHUNK_S * 16000) * 2)
    fed = 0
    for piece in pieces:
        try:
            await asyncio.wait_for(asyncio.shield(feeding := asyncio.ensure_future(session.feed(piece))), 0.5)
        except asyncio.TimeoutError:
            break
        fed += 1
    assert fed < len(pieces), "feed never pushed back"
    assert sum(e["type"] == "speech_end" for e in events) == MAX_FINALS_IN_FLIGHT + 1
    worker.start()  # the model catches up: the blocked feed returns and every final comes
    try:
        await feeding
        for piece in pieces[fed + 1 :]:
            await session.feed(piece)
        await session.finish()
    finally:
        worker.stop()
    finals = [e for e in events if e["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(sum(e["type"] == "speech_end" for e in events)))
    assert len(finals) >= MAX_FINALS_IN_FLIGHT + 2


@pytest.mark.slow
@pytest.mark.parametrize("window", ["exact", "fast"])
async def test_live_finals_equal_offline_on_either_window(whisper_base, english, window):
    """Window policy: with final_window = W, live finals equal `streamsed translate --window W`; the
    partials (fast window) are drafts for the finals and change nothing in them."""
    from streamsed.engine.offline import translate_segments

    worker = EngineWorker(whisper_base, final_window=window, partial_window="fast")
    worker.start()
    try:
        events = []
        session = StreamSession(SessionOptions("w"), worker, whisper_base, events.append)
        await stream_pcm(session, to_s16(english), 3200, pace=session.wait_partial)
    finally:
        await asyncio.to_thread(worker.stop)
    finals = [e for e in events if e["type"] == "final"]
    audio = pcm_to_float32(to_s16(english))
    offline = list(translate_segments(whisper_base, segment_audio(whisper_base, audio), [Target("en", "en")],
                                      window=window))
    assert [(f["segment"], f["start"], f["end"], f["text"]) for f in finals] == \
        [(r.segment, r.start, r.end, r.text) for r in offline]
    assert {f["window"] for f in finals} == {window}
    assert worker.stats.draft_offered > 0 and worker.stats.draft_accepted > 0  # the partials were drafts
