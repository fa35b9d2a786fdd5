"""``streamsed bench window``: word error rate and encoder time of the exact vs the fast window.

Clips: the real recordings of ``/usr/share/sounds/alsa`` (one person reading the speaker names
"Front Center", ...; the reference text is the file name) and espeak-ng English sentences of 2 to
about 20 s (one to four sentences in one utterance). Each clip is one utterance, decoded as a
final is: Whisper base, transcribe, English, greedy. For the exact window and for the fast window
at each margin, the bench reports the WER against the reference text (jiwer, lower-cased, without
punctuation) over all clips, how many clips came out in a repetition loop, and the encoder time
relative to the exact window in the same run. Fallbacks are switched off here: the bench measures
the raw fast window, not the rescued one.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ALSA_DIR = Path("/usr/share/sounds/alsa")
MARGINS = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
EXTRA_SENTENCES = (  # short commands and a sentence with numbers, next to bench decode's five
    "Turn on the lights in the kitchen.",
    "What time is it?",
    "The train to Berlin leaves from platform seven at half past nine.",
)


@dataclass
class Clip:
    name: str
    audio: np.ndarray
    reference: str


@dataclass
class WindowResult:
    window: str  # "exact" or "fast +Ns"
    margin_s: float | None
    wer: float  # over all clips, in percent
    loops: int  # clips whose text is a repetition loop
    encoder_seconds: float
    encoder_vs_exact: float
    texts: list[str]
    total_seconds: float = 0.0  # encoder + decoder
    dtype: str = "float32"
    total_vs_float32: float = 1.0  # against the float32 row of the same window


def clips(voice: str = "en-us") -> list[Clip]:
    """The real ALSA recordings plus espeak-ng utterances of one to four sentences."""
    import soundfile as sf
    import soxr

    from ..core.audio import MODEL_SAMPLE_RATE
    from .decode import SENTENCES, synthesize_speech

    sentences_all = SENTENCES + EXTRA_SENTENCES

    found = []
    for path in sorted(ALSA_DIR.glob("*.wav")):
        if path.stem == "Noise":
            continue  # no words in it: WER is undefined
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        mono = soxr.resample(audio.mean(axis=1), rate, MODEL_SAMPLE_RATE).astype(np.float32)
        found.append(Clip(f"alsa/{path.name}", mono, path.stem.replace("_", " ")))
    groups = [sentences_all[i : i + n] for n, i in ((1, 0), (1, 5), (1, 6), (2, 1), (2, 6), (3, 2), (4, 0), (4, 4))]
    for sentences in groups:
        audio = synthesize_speech(sentences, voice=voice, silence_s=0.3)  # short pauses: one utterance
        found.append(Clip(f"espeak/{len(sentences)}x ({len(audio) / MODEL_SAMPLE_RATE:.1f} s)", audio, " ".join(sentences)))
    return found


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s']", " ", text.lower())).strip()


def run_window_bench(model: str = "whisper-base", device: str = "cpu", margins=MARGINS, json_path: str | None = None,
                     dtype: str = "float32") -> dict:
    """Exact vs fast at every margin; with ``dtype="int8"``, float32 vs int8 on the exact and the
    default fast window instead (same clips, same run)."""
    import torch

    from ..engine.engine import DEFAULT_WINDOW_MARGIN_S
    from ..engine.loading import load_engine

    engines = {"float32": load_engine(model, device=device, dtype="float32")}
    if dtype == "int8":
        engines["int8"] = load_engine(model, device=device, dtype="int8")
        settings = [(kind, window, margin) for window, margin in (("exact", None), ("fast", DEFAULT_WINDOW_MARGIN_S))
                    for kind in engines]
    else:
        settings = [("float32", "exact", None)] + [("float32", "fast", m) for m in margins]
    data = clips()
    results = [measure(engines[kind], kind, window, margin, data) for kind, window, margin in settings]
    float32 = {r.window: r for r in results if r.dtype == "float32"}
    for result in results:
        result.encoder_vs_exact = round(result.encoder_seconds / results[0].encoder_seconds, 3)
        result.total_vs_float32 = round(result.total_seconds / float32[result.window].total_seconds, 3)
    report = {
        "model": model, "device": device, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "clips": [{"name": c.name, "seconds": round(len(c.audio) / 16000, 2), "reference": c.reference} for c in data],
        "results": [asdict(r) for r in results],
    }
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def measure(engine, kind: str, window: str, margin: float | None, data: list[Clip]) -> WindowResult:
    """Every clip as one final: encoder time, decode time, WER, loops."""
    import jiwer

    from ..core.languages import Target
    from ..engine.engine import LOOP_COMPRESSION_RATIO, compression_ratio

    if margin is not None:
        engine.window_margin_s = margin
    target = Target("en", "en")
    engine.decode(engine.encode([data[0].audio], window), [(0, target)])  # warm-up
    texts, encoder_s, decode_s = [], 0.0, 0.0
    for clip in data:  # one utterance at a time, as a final is decoded
        started = time.perf_counter()
        encoded = engine.encode([clip.audio], window)
        encoder_s += time.perf_counter() - started
        started = time.perf_counter()
        (hypothesis,) = engine.decode(encoded, [(0, target)])
        decode_s += time.perf_counter() - started
        texts.append(hypothesis.text)
    references = [normalize(c.reference) for c in data]
    wer = jiwer.wer(references, [normalize(t) or "<empty>" for t in texts]) * 100
    label = "exact (30 s)" if window == "exact" else f"fast +{margin:g} s"
    loops = sum(compression_ratio(t) > LOOP_COMPRESSION_RATIO for t in texts)
    return WindowResult(label, margin, round(wer, 1), loops, round(encoder_s, 3), 0.0, texts,
                        round(encoder_s + decode_s, 3), kind)


def format_report(report: dict) -> str:
    lines = [f"{len(report['clips'])} clips ({sum(c['seconds'] for c in report['clips']):.1f} s), "
             f"{report['model']} on {report['device']}, {report['threads']} threads, {report['date']}",
             "| dtype, window | WER % | loops | encoder (s) | encoder vs exact | encoder+decoder (s) | vs float32 |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in report["results"]:
        lines.append(f"| {r['dtype']} {r['window']} | {r['wer']:.1f} | {r['loops']} | {r['encoder_seconds']:.2f} | "
                     f"{r['encoder_vs_exact']:.2f}x | {r['total_seconds']:.2f} | {r['total_vs_float32']:.2f}x |")
    return "\n".join(lines)
