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

CONTENDERS = ("engine", "engine_drafts", "generate", "ct2_float32", "ct2_int8", "final_generate", "final_engine",
              "final_drafts", "final_int8_drafts")


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
    drafted = data["contenders"]["engine_drafts"]  # the last partial as draft: same text, fewer forwards
    assert drafted["texts"] == engine["texts"] and drafted["same_text_as_engine"]
    assert 0 < drafted["draft_stats"]["draft_accepted"] <= drafted["draft_stats"]["draft_offered"]
    assert drafted["draft_stats"]["steps"] < engine["decode_stats"]["steps"]
    one, one_drafted = data["contenders"]["final_generate"], data["contenders"]["final_drafts"]
    assert one_drafted["texts"] == one["texts"] and one["window"] == "fast"  # finals on the daemon's default window
    assert one_drafted["draft_stats"]["draft_accepted"] > 0
    int8_drafted = data["contenders"]["final_int8_drafts"]  # the daemon's CPU default: the same tokens
    assert int8_drafted["texts"] == one["texts"] and int8_drafted["draft_stats"]["draft_accepted"] > 0
    assert "good morning" in engine["texts"][0].lower()
    assert data["contenders"]["ct2_float32"]["intra_threads"] >= 1

    printed = capsys.readouterr().out
    assert "| streamsed engine |" in printed and "| transformers generate() |" in printed
    assert "WARNING" not in printed


def test_bench_load_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    """Starts the real daemon, streams 1 then 2 real-time clients, writes JSON and a PNG."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import soundfile as sf

    audio = bench.synthesize_speech(["Hello there.", "Good morning."], silence_s=0.8)
    wav = tmp_path / "talk.wav"
    sf.write(wav, audio, 16000)
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    assert main(["bench", "load", "--model", str(tiny_model_dir), "--audio", str(wav), "--streams", "1,2",
                 "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    assert data["u_seconds"] > 0 and [level["streams"] for level in data["levels"]] == [1, 2]
    for level in data["levels"]:
        assert level["refused"] == 0
        assert level["segments"] == 2 * level["streams"]  # every segment of every stream got its final
        assert level["final_lag_p50"] is not None and level["final_lag_max"] >= level["final_lag_p50"]
        assert 0 <= level["engine_busy"] <= 1 and level["rss_mb"] > 0
        assert 0 < level["vad_ms_per_stream_second"] < 1000  # Silero's CPU time per second of audio
    assert data["engine"]["requests"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| streams |" in capsys.readouterr().out


def test_bench_load_reports_why_its_daemon_exited(tmp_path):
    """The daemon's log is kept in a file (a pipe nobody reads could fill and block it) and its
    tail explains a daemon that dies before it is ready."""
    from streamsed.bench import load

    with pytest.raises(RuntimeError, match="the daemon exited: .*no-such-model"):
        with load.daemon_process(str(tmp_path / "no-such-model"), None):
            pass


def test_bench_load_rejects_bad_stream_counts(capsys):
    assert main(["bench", "load", "--streams", "1,x"]) == 2
    assert "--streams" in capsys.readouterr().err


def test_bench_window_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    """Runs on every clip (the ALSA recordings and espeak-ng utterances) and reports each window."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from streamsed.bench.window import normalize

    assert normalize("Front, Center.") == normalize("front center") == "front center"
    out = tmp_path / "window.json"
    assert main(["bench", "window", "--model", str(tiny_model_dir), "--margins", "2,5", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["window"] for r in data["results"]] == ["exact (30 s)", "fast +2 s", "fast +5 s"]
    assert len(data["clips"]) == 16 and sum(c["name"].startswith("alsa/") for c in data["clips"]) == 8
    for result in data["results"]:
        assert len(result["texts"]) == 16 and result["wer"] >= 0 and result["encoder_seconds"] > 0
    assert data["results"][0]["encoder_vs_exact"] == 1.0
    out8 = tmp_path / "int8.json"
    assert main(["bench", "window", "--model", str(tiny_model_dir), "--dtype", "int8", "--json", str(out8)]) == 0
    rows = json.loads(out8.read_text())["results"]
    assert [(r["dtype"], r["window"]) for r in rows] == [("float32", "exact (30 s)"), ("int8", "exact (30 s)"),
                                                          ("float32", "fast +5 s"), ("int8", "fast +5 s")]
    assert "| int8 fast +5 s |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_soak_on_a_tiny_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A short soak: streams reconnect pass after pass, listeners and MQTT follow, RSS is sampled."""
    import soundfile as sf

    from tests.tiny_models import NO_GUARD_ENV

    for key, value in NO_GUARD_ENV.items():  # the tiny model's loops would all be dropped
        monkeypatch.setenv(key, value)
    audio = bench.synthesize_speech(["Hello there."], silence_s=0.8)
    wav = tmp_path / "talk.wav"
    sf.write(wav, audio, 16000)
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    assert main(["bench", "soak", "--model", str(tiny_model_dir), "--audio", str(wav), "--minutes", "0.5",
                 "--streams", "2", "--listeners", "1", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    assert data["streams"] == 2 and data["mqtt"] is True
    assert data["sessions"] >= 4 and data["finals"] >= data["sessions"] - 2  # reconnects, finals keep coming
    assert data["listener_events"] > 0 and data["mqtt_messages"] > 0
    assert len(data["samples"]) >= 2 and all(s["rss_mb"] > 0 for s in data["samples"])
    assert data["rss_growth"] is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "soak", "--minutes", "0"]) == 2
