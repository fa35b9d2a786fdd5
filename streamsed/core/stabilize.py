"""LocalAgreement-2: turn a series of partial hypotheses into committed and tentative text (sans-I/O).

A streaming decoder re-reads a growing utterance every chunk, and each new hypothesis may rewrite
its last words. LocalAgreement-2 commits what the last two hypotheses agree on:

* Hypotheses are split into *units*: whitespace-separated words, except that CJK characters (Han,
  kana, CJK punctuation, full-width forms), written without spaces, are one unit each.
* After the committed units, the tails of the previous and the current hypothesis are compared from
  their start; their longest common prefix is appended to the committed units.
* Committed text never changes: it only grows, even when a later hypothesis disagrees with it. The
  current hypothesis is aligned to the committed text by position: its first ``len(committed)``
  units are taken to be the committed ones, and the rest is its tail (the *unstable* text).

``update`` returns ``(stable, unstable)``; ``join_text(stable, unstable)`` is the current view:
the two joined by a space, or directly when the boundary is between CJK characters.
"""

from __future__ import annotations

import re

# Scripts written without spaces between words: CJK radicals and symbols, kana, bopomofo, Han
# (extension A and unified), compatibility ideographs and full-width forms. Hangul is not here:
# Korean separates words with spaces.
_CJK_RANGES = "\u2e80-\u2fff\u3000-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_UNIT = re.compile(f"[{_CJK_RANGES}]|[^\\s{_CJK_RANGES}]+")
_CJK_CHAR = re.compile(f"[{_CJK_RANGES}]")

__all__ = ["LocalAgreement", "join_text", "split_units"]


def split_units(text: str) -> list[str]:
    """Words of ``text``, with every CJK character a unit of its own."""
    return _UNIT.findall(text)


def _is_cjk(char: str) -> bool:
    return bool(_CJK_CHAR.match(char))


def join_text(left: str, right: str) -> str:
    """Join two pieces of text: with a space, unless either side of the seam is a CJK character."""
    if not left or not right:
        return left or right
    if _is_cjk(left[-1]) or _is_cjk(right[0]):
        return left + right
    return f"{left} {right}"


def join_units(units: list[str]) -> str:
    text = ""
    for unit in units:
        text = join_text(text, unit)
    return text


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return a[:length]


class LocalAgreement:
    """LocalAgreement-2 over the hypotheses of one utterance; ``reset()`` before the next one."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._committed: list[str] = []
        self._stable = ""
        self._previous_tail: list[str] | None = None  # None until the first hypothesis

    @property
    def stable(self) -> str:
        """The committed text so far."""
        return self._stable

    def update(self, hypothesis_text: str) -> tuple[str, str]:
        """Take the newest hypothesis of the whole utterance; return (stable, unstable)."""
        tail = split_units(hypothesis_text)[len(self._committed):]
        if self._previous_tail is not None:
            agreed = _common_prefix(self._previous_tail, tail)
            if agreed:
                self._committed += agreed
                # Rendering is pairwise, so the old stable text stays an exact prefix of the new one.
                self._stable = join_units(self._committed)
                tail = tail[len(agreed):]
        self._previous_tail = tail
        return self._stable, join_units(tail)
