"""``streamsed bench decode`` (streamsed.bench): runs end to end and reports every contender.

Never asserts speed: timings depend on the machine. The slow test runs the real benchmark with
``--repeat 1`` on ~3.5 s of espeak-ng speech and checks the JSON it writes.
"""

from __future__ import annotations

import json
import shutil

import pytest

from streamsed.bench import decode as bench
from streamsed.cli import main

CONTENDERS = ("engine", "generate", "ct2_float32", "ct2_int8")


def test_generated_strips_echoed_prompt_and_stops_at_eos():
    prompt, stop = [1, 2, 3], {9}
    assert bench._generated([1, 2, 3, 5, 6, 9, 9], prompt, stop) == [5, 6]
    assert bench._generated([5, 6, 9, 4], prompt, stop) == [5, 6]  # prompt not echoed
    assert bench._generated([5, 6], prompt, stop) == [5, 6]  # no EOS (hit max length)


def test_time_interleaved_runs_round_robin_and_keeps_the_fastest_result():
    calls = []

    def make(key):
        def fn():
            calls.append(key)
            return len(calls)

        return fn

    timed = bench.time_interleaved({"a": make("a"), "b": make("b")}, repeat=2, sync=lambda: None)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-up of each, then alternating
    for key in "ab":
        assert len(timed[key].runs) == 2 and timed[key].best == min(timed[key].runs) > 0
        assert timed[key].result in {n for n, k in enumerate(calls, 1) if k == key}


def test_batches_follow_translate_batch_size():
    assert [len(b) for b in bench._batches(list(range(19)))] == [8, 8, 3]


@pytest.mark.slow
def test_bench_decode_end_to_end(tmp_path, capsys):
    pytest.importorskip("ctranslate2")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import soundfile as sf

    audio = bench.synthesize_speech(["Good morning, how are you today?"], silence_s=0.8)
    wav = tmp_path / "short.wav"
    sf.write(wav, audio, 16000)
    out = tmp_path / "bench.json"

    assert main(["bench", "decode", "--audio", str(wav), "--repeat", "1", "--device", "cpu", "--json", str(out)]) == 0

    data = json.loads(out.read_text())
    assert data["audio"]["segments"] >= 1
    assert data["baseline"] == "generate"
    assert set(data["contenders"]) == set(CONTENDERS)
    for key in CONTENDERS:
        c = data["contenders"][key]
        assert c["encoder_seconds"] > 0 and c["decode_seconds"] > 0, key
        assert len(c["decode_runs"]) == 1 and len(c["encoder_runs"]) == 1, key
        assert c["tokens"] > 0, key
        assert all(c["texts"]), key
    engine, generate = data["contenders"]["engine"], data["contenders"]["generate"]
    assert engine["texts"] == generate["texts"]
    assert data["texts_identical_engine_generate"] is True
    assert engine["tokens"] == generate["tokens"] == engine["decode_stats"]["tokens"]
    assert engine["decode_stats"]["steps"] > 0
    assert "good morning" in engine["texts"][0].lower()
    assert data["contenders"]["ct2_float32"]["intra_threads"] >= 1

    printed = capsys.readouterr().out
    assert "| streamsed engine |" in printed and "| transformers generate() |" in printed
    assert "WARNING" not in printed
