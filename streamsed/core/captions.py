"""Caption and result formats from timed text segments: SRT, WebVTT, JSON lines, plain text (sans-I/O).

SRT and WebVTT follow the usual broadcast and streaming subtitle rules: a final longer than one cue
is split at word boundaries into cues of at most ``MAX_LINES`` lines of ``MAX_LINE_CHARS``
characters and at most ``MAX_CUE_S`` seconds, timed by the final's word timings (or, without them,
in proportion to the characters). Cue ids are ``<segment>-<n>`` (WebVTT), so a cue keeps its id as
later finals are added; SRT numbers its cues 1, 2, 3 ... in order, as the format requires.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal

from .audio import MODEL_SAMPLE_RATE


@dataclass(frozen=True)
class Caption:
    """One cue: ``index`` is the segment number, ``start``/``end`` are in seconds."""

    index: int
    start: float
    end: float
    text: str
    words: list[dict] | None = None  # [{"word", "start", "end"}] in seconds: where to split long text

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"caption index must not be negative, got {self.index}")
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or not 0 <= self.start <= self.end:
            raise ValueError(f"caption needs 0 <= start <= end, got start={self.start}, end={self.end}")


def format_timestamp(seconds: float, fmt: str = "srt") -> str:
    """Format as ``HH:MM:SS,mmm`` (srt) or ``HH:MM:SS.mmm`` (vtt), rounded to the nearest millisecond.

    Hours grow past two digits rather than wrapping.
    """
    separators = {"srt": ",", "vtt": "."}
    if fmt not in separators:
        raise ValueError(f"unknown caption format {fmt!r}; expected 'srt' or 'vtt'")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timestamp must be a non-negative number of seconds, got {seconds}")
    # Round the decimal value as written (59.9995 -> 60.000): binary floats would
    # otherwise round some halves down, and round() rounds halves to even.
    total_ms = int(Decimal(repr(float(seconds))).scaleb(3).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    hours, rest_ms = divmod(total_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs, millis = divmod(rest_ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separators[fmt]}{millis:03d}"


MAX_LINE_CHARS = 42
MAX_LINES = 2
MAX_CUE_S = 7.0


@dataclass(frozen=True)
class Cue:
    id: str  # "<segment>-<n>"
    start: float
    end: float
    lines: list[str]


def to_srt(captions: Iterable[Caption]) -> str:
    """Render SRT; cues are numbered from 1 in order, as SRT requires. Blank captions are skipped."""
    blocks = []
    for number, cue in enumerate((cue for caption in captions for cue in split_cues(caption)), start=1):
        timing = f"{format_timestamp(cue.start, 'srt')} --> {format_timestamp(cue.end, 'srt')}"
        blocks.append("\n".join([str(number), timing, *cue.lines]) + "\n")
    return "\n".join(blocks)


def to_vtt(captions: Iterable[Caption]) -> str:
    """Render WebVTT; cue ids are ``<segment>-<n>``, stable as cues are added. Blank captions are skipped."""
    blocks = ["WEBVTT\n"]
    for caption in captions:
        for cue in split_cues(caption):
            # Escaping '>' as well as '&' and '<' also keeps '-->' out of cue text, where it is not allowed.
            lines = [html.escape(line, quote=False) for line in cue.lines]
            timing = f"{format_timestamp(cue.start, 'vtt')} --> {format_timestamp(cue.end, 'vtt')}"
            blocks.append("\n".join([cue.id, timing, *lines]) + "\n")
    return "\n".join(blocks)


def split_cues(caption: Caption) -> list[Cue]:
    """One caption as subtitle cues: at most MAX_LINES x MAX_LINE_CHARS and MAX_CUE_S each, cut
    between words. The first cue starts at the caption's start, the last ends at its end, and each
    cut falls at the start of the next cue's first word, so the cues follow one another without gaps."""
    words = _timed_words(caption)
    if not words:
        return []
    groups: list[list[dict]] = [[]]
    group_start = caption.start
    for word in words:
        current = groups[-1]
        candidate = [w["word"] for w in current] + [word["word"]]
        too_long = word["end"] - group_start > MAX_CUE_S and current
        if current and (too_long or _wrap(candidate) is None):
            groups.append([])
            group_start = word["start"]
        groups[-1].append(word)
    cues = []
    for n, group in enumerate(groups):
        start = caption.start if n == 0 else group[0]["start"]
        end = caption.end if n == len(groups) - 1 else groups[n + 1][0]["start"]
        lines = _wrap([w["word"] for w in group]) or [" ".join(w["word"] for w in group)]
        cues.append(Cue(f"{caption.index}-{n}", start, max(end, start), lines))
    return cues


def _timed_words(caption: Caption) -> list[dict]:
    """The caption's words with times: its word timings when they cover its text, else the text's
    words spread over the caption in proportion to their characters."""
    text = " ".join(_text_lines(caption.text))
    words = [w for w in caption.words or [] if w["word"].strip()]
    if words and " ".join(w["word"].strip() for w in words).split() == text.split():
        times = [(min(max(w["start"], caption.start), caption.end), min(max(w["end"], caption.start), caption.end))
                 for w in words]
        return [{"word": w["word"].strip(), "start": s, "end": max(e, s)} for w, (s, e) in zip(words, times)]
    plain = text.split()
    total = sum(len(w) + 1 for w in plain) or 1
    span, position, timed = caption.end - caption.start, 0, []
    for word in plain:
        start = caption.start + span * position / total
        position += len(word) + 1
        timed.append({"word": word, "start": start, "end": caption.start + span * position / total})
    return timed


def _wrap(words: list[str]) -> list[str] | None:
    """The words on at most MAX_LINES lines of at most MAX_LINE_CHARS, the break as balanced as
    possible; None when they do not fit (a single over-long word still gets a line of its own)."""
    one = " ".join(words)
    if len(one) <= MAX_LINE_CHARS:
        return [one]
    if MAX_LINES < 2 or len(words) < 2:
        return None
    best = None
    for cut in range(1, len(words)):
        first, second = " ".join(words[:cut]), " ".join(words[cut:])
        if len(first) <= MAX_LINE_CHARS and len(second) <= MAX_LINE_CHARS:
            score = abs(len(first) - len(second))
            if best is None or score < best[0]:
                best = (score, [first, second])
    return best[1] if best else None


def _text_lines(text: str) -> list[str]:
    """Non-blank, stripped lines of ``text``: a blank line would end the cue early in both formats."""
    return [line.strip() for line in text.splitlines() if line.strip()]


FORMATS = ("text", "jsonl", "srt", "vtt")


@dataclass(frozen=True)
class SegmentResult:
    """One decoded (segment, target): what ``streamsed translate`` prints per line of jsonl."""

    segment: int
    start: float  # seconds, millisecond precision
    end: float
    source_lang: str | None
    target_lang: str | None
    text: str
    avg_logprob: float | None = None  # the guard's scores (core/guard.py), when the model gives them
    no_speech_prob: float | None = None
    words: list[dict] | None = None  # [{"word", "start", "end"}] in stream seconds, when the model gives them

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)

    @classmethod
    def decoded(cls, segment, hypothesis) -> SegmentResult:
        """The result of decoding a VAD ``segment`` (core.vad.SpeechEnded) into ``hypothesis`` (an
        engine Hypothesis: target, text, scores, words in seconds from the segment start)."""
        offset = segment.start / MODEL_SAMPLE_RATE
        words = None if hypothesis.words is None else [
            {"word": w["word"], "start": round(w["start"] + offset, 3), "end": round(w["end"] + offset, 3)}
            for w in hypothesis.words
        ]
        scores = [None if v is None else round(v, 4) for v in (hypothesis.avg_logprob, hypothesis.no_speech_prob)]
        return cls(segment.segment, round(offset, 3), round(segment.end / MODEL_SAMPLE_RATE, 3),
                   hypothesis.target.source_lang, hypothesis.target.target_lang, hypothesis.text, *scores, words)


def format_results(results: list[SegmentResult], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(r.to_json() + "\n" for r in results)
    if fmt == "text":
        return "".join(r.text + "\n" for r in results)
    captions = [Caption(r.segment, r.start, r.end, r.text, r.words) for r in results]
    if fmt == "srt":
        return to_srt(captions)
    if fmt == "vtt":
        return to_vtt(captions)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
