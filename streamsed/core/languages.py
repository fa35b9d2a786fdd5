"""Languages and targets: what a stream or a file is turned into (sans-I/O, no torch).

A ``Target`` is one output of an utterance (``target_lang`` text from ``source_lang`` speech).
``parse_language`` rejects what cannot be a language code before any model work, and
``resolve_targets`` fills in a model's defaults and checks each target against it. The model is
seen only through ``EngineInfo``, the few pure-Python facts every engine provides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Target", "UnsupportedTarget", "EngineInfo", "parse_language", "resolve_targets", "context_text",
           "MAX_PROMPT_CHARS"]

_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")


class UnsupportedTarget(ValueError):
    """A (source, target) language pair the loaded model cannot produce."""


@dataclass(frozen=True)
class Target:
    """What to produce from an utterance: ``target_lang`` text from ``source_lang`` speech.

    ``None`` means "the model's default" (Whisper: detect/assume English and transcribe;
    single-language models: their only output language).
    """

    source_lang: str | None = None
    target_lang: str | None = None
    # Previous-text context (Whisper's <|startofprev|>: a prompt, hotwords): it steers spelling and
    # style, and changes the output, so a target with a prompt is not generate()'s plain result.
    prompt: str | None = None


class EngineInfo(Protocol):
    """The pure-Python facts sessions and pipelines need about the model (an ``Engine`` provides them)."""

    max_window_s: float | None

    def default_target(self) -> Target: ...

    def check_target(self, target: Target) -> None: ...

    def frame_classifier(self, vad): ...  # a fresh core.vad.FrameClassifier for one stream


def parse_language(code: str | None, role: str) -> str | None:
    """Normalize a user-given language code; reject what cannot be a code before any model work."""
    if code is None or code in ("", "auto"):
        return None
    code = code.strip().lower()
    if not _LANGUAGE_CODE.match(code):
        raise UnsupportedTarget(f"{role} language {code!r} is not an ISO 639 code like 'en' or 'de'")
    return code


MAX_PROMPT_CHARS = 2000  # far more than the 223 tokens Whisper keeps; longer text is refused, not cut


def context_text(prompt: str | None = None, hotwords: str | None = None) -> str | None:
    """The context a target carries: hotwords first, then the prompt, as faster-whisper orders them
    (``hotwords`` + ``initial_prompt`` after <|startofprev|>). None when both are empty."""
    parts = []
    for name, value in (("hotwords", hotwords), ("prompt", prompt)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text, got {type(value).__name__}")
        if value.strip():
            parts.append(value.strip())
    text = " ".join(parts)
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt and hotwords are {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    return text or None


def resolve_targets(engine: EngineInfo, source_lang: str | None, target_langs: list[str | None],
                    prompt: str | None = None) -> list[Target]:
    """Targets with the model's defaults filled in, each checked against the model."""
    default = engine.default_target()
    source = source_lang or default.source_lang
    targets = [Target(source, target or source or default.target_lang, prompt) for target in target_langs or [None]]
    for target in targets:
        engine.check_target(target)
    return targets
