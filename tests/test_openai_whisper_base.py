"""The OpenAI-compatible API on the real default model: a translation through the official SDK equals
``streamsed translate --target-lang en``, and word timestamps come back (slow: loads Whisper base)."""

import asyncio
import io
import json

import numpy as np
import openai
import pytest
import soundfile as sf

from streamsed.cli import main
from streamsed.daemon.config import load_config, with_overrides
from streamsed.daemon.server import Daemon
from streamsed.engine.loading import load_engine
from tests.speech import espeak, silence

pytestmark = pytest.mark.slow


async def test_a_translation_equals_streamsed_translate_and_words_are_timed(tmp_path, capsys):
    german = np.concatenate([silence(0.5), espeak("Guten Morgen. Wie geht es dir?", "de", 130), silence(1.0),
                             espeak("Ich habe heute keine Zeit.", "de", 130), silence(1.0)])
    path = tmp_path / "de.wav"
    sf.write(path, german, 16000, subtype="FLOAT")
    assert main(["translate", str(path), "--source-lang", "de", "--target-lang", "en", "--format", "jsonl"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(expected) >= 2
    daemon = Daemon(with_overrides(load_config(env={}), server={"port": 0, "auth_tokens": ["t"]}),
                    load_engine("whisper-base", device="cpu"))
    await daemon.start()
    await daemon.wait_ready()

    def calls():
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="t", max_retries=0)
        data = path.read_bytes()
        translated = api.audio.translations.create(model="whisper-base", file=("de.wav", data),
                                                   response_format="verbose_json", extra_body={"language": "de"})
        words = api.audio.transcriptions.create(model="whisper-base", file=("de.wav", io.BytesIO(data)),
                                                language="de", response_format="verbose_json",
                                                timestamp_granularities=["word", "segment"])
        return translated, words

    try:
        translated, words = await asyncio.to_thread(calls)
    finally:
        await daemon.stop()
    assert [s.text.strip() for s in translated.segments] == [e["text"] for e in expected]
    assert [(s.start, s.end) for s in translated.segments] == [(e["start"], e["end"]) for e in expected]
    assert translated.text.lower().startswith("good morning"), translated.text
    assert words.language == "german" and words.words
    starts = [w.start for w in words.words]
    assert starts == sorted(starts) and all(w.start <= w.end <= words.duration for w in words.words)
    assert " ".join(w.word.strip() for w in words.words).split() == words.text.split()


async def test_a_prompt_through_the_api_equals_translate_with_the_same_prompt(tmp_path, capsys):
    path = tmp_path / "en.wav"
    sf.write(path, np.concatenate([silence(0.5), espeak("We deployed Kubernetes with Grafana and Prometheus.", "en",
                                                        130), silence(1.0)]), 16000, subtype="FLOAT")
    prompt = "kubectl, Grafana, Prometheus"
    assert main(["translate", str(path), "--source-lang", "en", "--prompt", prompt]) == 0
    expected = " ".join(capsys.readouterr().out.split("\n")).strip()  # text: one line per segment
    assert "Grafana" in expected, expected
    daemon = Daemon(with_overrides(load_config(env={}), server={"port": 0}), load_engine("whisper-base", device="cpu"))
    await daemon.start()
    await daemon.wait_ready()

    def call():
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="none", max_retries=0)
        return api.audio.transcriptions.create(model="whisper-base", file=("en.wav", path.read_bytes()),
                                               language="en", prompt=prompt, response_format="text")

    try:
        text = await asyncio.to_thread(call)
    finally:
        await daemon.stop()
    assert text.strip() == expected
