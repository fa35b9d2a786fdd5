"""The OpenAI-compatible audio API, driven by the official ``openai`` SDK and by curl (tiny model).

The tiny random Whisper writes nonsense, so these tests hold the API to the offline pipeline
(``translate_segments`` on the same audio and window, segment by segment): every response format
must carry exactly its segments. ``test_openai_whisper_base.py`` checks real speech.
"""

import asyncio
import io
import json
import subprocess
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import soundfile as sf
import webvtt

from streamsed.core.audio import pcm_to_float32
from streamsed.core.guard import GuardConfig
from streamsed.core.languages import Target
from streamsed.core.segments import segment_audio
from streamsed.daemon.config import load_config, with_overrides
from streamsed.daemon.server import Daemon
from streamsed.engine.loading import engine_from_model
from streamsed.engine.offline import translate_segments
from tests import tiny_models as tm
from tests.speech import espeak, silence

TOKEN = "api-token"


@pytest.fixture(scope="module")
def engine():
    model, extractor, tokenizer = tm.tiny_whisper(prev_token=True)
    return engine_from_model(model, extractor, tokenizer, name="tiny-whisper", device="cpu")


@pytest.fixture(scope="module")
def speech():
    return np.concatenate([silence(0.3), espeak("Hello everyone.", "en", 140), silence(1.0),
                           espeak("Thank you for coming.", "en", 140), silence(1.0)])


def wav_bytes(audio: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([audio] * channels, axis=1) if channels > 1 else audio, rate, format="WAV",
             subtype="FLOAT")  # float samples: the daemon decodes exactly the audio offline() gets
    return buffer.getvalue()


async def started(engine, api=None, **server):
    # One request per batch, so that the comparison with segments decoded one by one cannot depend on
    # which requests the worker happened to batch (batching is test_worker's and test_scheduler's).
    config = with_overrides(load_config(env={}), server={"port": 0, "auth_tokens": [TOKEN], **server},
                            guard=tm.NO_GUARD, api=api or {}, model={"max_batch_utterances": 1})
    daemon = Daemon(config, engine)
    await daemon.start()
    await daemon.wait_ready()
    return daemon


def client(daemon, key=TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key=key, max_retries=0)


def offline(engine, audio, target):
    segments = segment_audio(engine, audio)
    return list(translate_segments(engine, segments, [target], batch_size=1, window="auto",
                                   guard=GuardConfig(enabled=False)))


async def test_every_response_format_carries_the_offline_segments(engine, speech):
    daemon = await started(engine)
    expected = offline(engine, speech, Target("en", "en"))
    assert len(expected) == 2
    wav = wav_bytes(speech)

    def calls():
        api = client(daemon)
        create = api.audio.transcriptions.create
        common = {"model": "tiny-whisper", "file": ("talk.wav", wav), "language": "en"}
        return (create(**common), create(**common, response_format="text"),
                create(**common, response_format="srt"), create(**common, response_format="vtt"),
                create(**common, response_format="verbose_json", timestamp_granularities=["segment"]),
                create(**common, temperature=0))

    try:
        plain, text, srt, vtt, verbose, zero = await asyncio.to_thread(calls)
    finally:
        await daemon.stop()
    joined = " ".join(r.text for r in expected)
    assert plain.text == joined == zero.text
    assert text == joined + "\n"
    cues = webvtt.from_buffer(io.StringIO(vtt))
    assert " ".join(c.text.replace("\n", " ") for c in cues) == joined
    assert cues[0].start == f"00:00:{expected[0].start:06.3f}"
    assert srt.startswith("1\n") and srt.count(" --> ") == len(cues)
    assert verbose.task == "transcribe" and verbose.language == "english" and verbose.text == joined
    assert verbose.duration == pytest.approx(len(speech) / 16000, abs=0.001)
    assert [(s.id, s.start, s.end, s.text.strip(), s.avg_logprob) for s in verbose.segments] == [
        (i, r.start, r.end, r.text, r.avg_logprob) for i, r in enumerate(expected)]
    assert daemon.worker.stats.requests >= 2 * 6  # every file segment went through the live worker


async def test_a_translation_and_a_prompt_equal_the_offline_pipeline(engine, speech):
    daemon = await started(engine)
    wav = wav_bytes(speech)

    def calls():
        api = client(daemon)
        translated = api.audio.translations.create(model="tiny-whisper", file=("de.wav", wav),
                                                   extra_body={"language": "de"}, response_format="verbose_json")
        prompted = api.audio.transcriptions.create(model="tiny-whisper", file=("en.wav", wav), language="en",
                                                   prompt="w5 w6 w7", extra_body={"hotwords": "w8"})
        return translated, prompted

    try:
        translated, prompted = await asyncio.to_thread(calls)
    finally:
        await daemon.stop()
    assert translated.task == "translate" and translated.language == "german", translated.language
    assert [s.text.strip() for s in translated.segments] == [r.text for r in offline(engine, speech, Target("de", "en"))]
    with_prompt = offline(engine, speech, Target("en", "en", "w8 w5 w6 w7"))  # hotwords first, as faster-whisper
    assert prompted.text == " ".join(r.text for r in with_prompt)
    assert prompted.text != " ".join(r.text for r in offline(engine, speech, Target("en", "en")))


async def test_errors_have_openai_shapes_and_the_sdk_raises_its_own_exceptions(engine, speech):
    daemon = await started(engine, api={"max_upload_mb": 0.2})
    wav = wav_bytes(speech[:16000])

    def calls():
        api = client(daemon)
        raised = {}
        attempts = {
            "wrong key": lambda: client(daemon, "wrong").audio.transcriptions.create(model="tiny-whisper",
                                                                                     file=("a.wav", wav)),
            "wrong model": lambda: api.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav)),
            "text file": lambda: api.audio.transcriptions.create(model="tiny-whisper", file=("a.txt", b"hello")),
            "empty file": lambda: api.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", b"")),
            "temperature": lambda: api.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", wav),
                                                                   temperature=0.7),
            "format": lambda: api.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", wav),
                                                              response_format="diarized_json"),
            "words without verbose": lambda: api.audio.transcriptions.create(
                model="tiny-whisper", file=("a.wav", wav), timestamp_granularities=["word"]),
            "language": lambda: api.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", wav),
                                                                language="xx-yy"),
            "too large": lambda: api.audio.transcriptions.create(model="tiny-whisper",
                                                                 file=("big.wav", wav_bytes(speech[:16000 * 8]))),
            "unknown model": lambda: api.models.retrieve("whisper-1"),
        }
        for name, attempt in attempts.items():
            try:
                attempt()
            except openai.APIStatusError as error:
                raised[name] = error
        return raised, api.models.retrieve("tiny-whisper"), list(api.models.list())

    try:
        raised, model, models = await asyncio.to_thread(calls)
        status, body = await asyncio.to_thread(post_raw, daemon.port, "/v1/audio/transcriptions", b"x",
                                               {"Content-Type": "text/plain", "Authorization": f"Bearer {TOKEN}"})
        missing_key = await asyncio.to_thread(post_raw, daemon.port, "/v1/models", None, {})
        wrong_method = await asyncio.to_thread(post_raw, daemon.port, "/v1/models", b"{}",
                                               {"Authorization": f"Bearer {TOKEN}"})
    finally:
        await daemon.stop()
    assert isinstance(raised["wrong key"], openai.AuthenticationError)
    assert isinstance(raised["wrong model"], openai.NotFoundError)
    assert raised["wrong model"].body["code"] == "model_not_found"
    assert isinstance(raised["unknown model"], openai.NotFoundError)
    for name in ("text file", "empty file", "temperature", "format", "words without verbose", "language"):
        assert isinstance(raised[name], openai.BadRequestError), name
    assert raised["text file"].body["param"] == "file"
    assert raised["temperature"].body["param"] == "temperature"
    assert raised["too large"].status_code == 413 and raised["too large"].body["code"] == "request_too_large"
    assert status == 400 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert missing_key[0] == 401 and json.loads(missing_key[1])["error"]["code"] == "invalid_api_key"
    assert wrong_method[0] == 405
    assert model.id == "tiny-whisper" and [m.id for m in models] == ["tiny-whisper"]


def post_raw(port, path, body, headers):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_curl_uploads_plain_chunked_and_with_100_continue_while_websockets_still_work(engine, speech, tmp_path):
    daemon = await started(engine, api={"model_aliases": ["whisper-1"]})
    stereo = tmp_path / "stereo-44k.wav"
    stereo.write_bytes(wav_bytes(np.interp(np.arange(0, len(speech), 16000 / 44100), np.arange(len(speech)), speech)
                                 .astype(np.float32), 44100, channels=2))
    base = ["curl", "-sS", f"http://127.0.0.1:{daemon.port}/v1/audio/transcriptions",
            "-H", f"Authorization: Bearer {TOKEN}", "-F", f"file=@{stereo}", "-F", "model=whisper-1",
            "-F", "language=en", "-F", "response_format=text"]

    def run(*extra):
        return subprocess.run(base + list(extra), capture_output=True, text=True, timeout=60, check=True).stdout

    try:
        plain = await asyncio.to_thread(run)
        chunked = await asyncio.to_thread(run, "-H", "Transfer-Encoding: chunked")
        continued = await asyncio.to_thread(run, "-H", "Expect: 100-continue")
        health = await asyncio.to_thread(subprocess.run, ["curl", "-sS", f"http://127.0.0.1:{daemon.port}/healthz"],
                                         capture_output=True, text=True, timeout=10)
    finally:
        await daemon.stop()
    assert plain.strip() and plain == chunked == continued  # a stereo 44.1 kHz upload is mixed down and resampled
    assert health.stdout == "ok\n"


async def test_live_streams_take_a_prompt_and_their_finals_equal_offline_with_it(engine, speech):
    from websockets.asyncio.client import connect

    daemon = await started(engine)
    pcm = (speech * 32767).astype("<i2").tobytes()
    url = f"ws://127.0.0.1:{daemon.port}/v1/stream?token={TOKEN}"
    finals = []
    try:
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "source_lang": "en", "prompt": "w6 w7", "hotwords": "w5"}))
            ready = json.loads(await ws.recv())
            await ws.send(pcm)
            await ws.send(json.dumps({"type": "stop"}))
            async for message in ws:
                event = json.loads(message)
                if event["type"] == "final":
                    finals.append(event["text"])
    finally:
        await daemon.stop()
    assert ready["prompt"] == "w5 w6 w7"
    received = pcm_to_float32(pcm)  # what the session decodes: the 16-bit samples
    assert finals == [r.text for r in offline(engine, received, Target("en", "en", "w5 w6 w7"))]
    assert finals != [r.text for r in offline(engine, received, Target("en", "en"))]


async def test_models_without_previous_text_context_refuse_a_prompt_with_400(speech):
    seed = tm.speech_encoder_decoder(tm.wav2vec2_config(), tm.bert_decoder_config())
    engine = engine_from_model(seed, tm.wav2vec2_feature_extractor(), tm.word_tokenizer(), name="seed", device="cpu")
    daemon = await started(engine)

    def call():
        try:
            client(daemon).audio.transcriptions.create(model="seed", file=("a.wav", wav_bytes(speech)), prompt="hi")
        except openai.BadRequestError as error:
            return error

    try:
        error = await asyncio.to_thread(call)
    finally:
        await daemon.stop()
    assert error is not None and "prompt" in error.message
