"""Caption and result formats from timed text segments: SRT, WebVTT, JSON lines, plain text (sans-I/O)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal


@dataclass(frozen=True)
class Caption:
    """One cue: ``index`` is the segment number, ``start``/``end`` are in seconds."""

    index: int
    start: float
    end: float
    text: str

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


def to_srt(captions: Iterable[Caption]) -> str:
    """Render SRT; cues are numbered ``index + 1`` because SRT counters start at 1.

    Captions whose text is blank are skipped: an empty cue shows nothing.
    """
    cues = []
    for caption in captions:
        lines = _text_lines(caption.text)
        if not lines:
            continue
        timing = f"{format_timestamp(caption.start, 'srt')} --> {format_timestamp(caption.end, 'srt')}"
        cues.append("\n".join([str(caption.index + 1), timing, *lines]) + "\n")
    return "\n".join(cues)


def to_vtt(captions: Iterable[Caption]) -> str:
    """Render WebVTT; the cue identifier is the segment index, so it stays stable as cues are added.

    Captions whose text is blank are skipped: an empty cue shows nothing.
    """
    cues = ["WEBVTT\n"]
    for caption in captions:
        # Escaping '>' as well as '&' and '<' also keeps '-->' out of cue text, where it is not allowed.
        lines = [html.escape(line, quote=False) for line in _text_lines(caption.text)]
        if not lines:
            continue
        timing = f"{format_timestamp(caption.start, 'vtt')} --> {format_timestamp(caption.end, 'vtt')}"
        cues.append("\n".join([str(caption.index), timing, *lines]) + "\n")
    return "\n".join(cues)


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def format_results(results: list[SegmentResult], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(r.to_json() + "\n" for r in results)
    if fmt == "text":
        return "".join(r.text + "\n" for r in results)
    captions = [Caption(r.segment, r.start, r.end, r.text) for r in results]
    if fmt == "srt":
        return to_srt(captions)
    if fmt == "vtt":
        return to_vtt(captions)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
