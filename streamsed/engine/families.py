"""Per-architecture knowledge: how to prompt a decoder and how to run one decoder step.

Every speech seq2seq model the engine serves is one of three families:

- ``whisper``: WhisperForConditionalGeneration. Prompt ``<|startoftranscript|><|lang|><|task|>
  <|notimestamps|>``; suppress and begin-suppress token lists from its generation config.
- ``speech_to_text``: Speech2TextForConditionalGeneration (fairseq S2T). Start token, plus a forced
  target-language token for multilingual checkpoints.
- ``speech_encoder_decoder``: SpeechEncoderDecoderModel, any speech encoder with any causal LM
  decoder (BERT, GPT2, BART/mBART decoder...). Start token, plus a forced target-language BOS
  token when the decoder's tokenizer has language tokens (mBART ``de_DE``, M2M ``__de__``).

A family only knows token ids and module calls; the engine owns batching, caching and devices.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from ..core.languages import Target, UnsupportedTarget
from .projection import project

if TYPE_CHECKING:  # annotations only: this module stays importable without torch
    import torch

__all__ = ["Family", "Target", "UnsupportedTarget", "family_for", "language_tokens"]


def _positions(states: torch.Tensor, last: int | list[int]) -> torch.Tensor:
    """[batch, positions, ...] -> the ``last`` positions, or the positions listed (only the logits
    that are used get projected: the vocabulary projection is the costliest part of a step)."""
    return states[:, -last:] if isinstance(last, int) else states[:, last]


_LANGUAGE_TOKEN_PATTERNS = (
    re.compile(r"^<\|([a-z]{2,3}|haw|yue)\|>$"),  # Whisper
    re.compile(r"^__([a-z]{2,3})__$"),  # M2M100, Speech2Text multilingual
    re.compile(r"^([a-z]{2,3})_[A-Z]{2}$"),  # mBART-50 / mBART-cc25
    re.compile(r"^<lang:([a-z]{2,3})>$"),  # explicit tags in custom vocabularies
)


def language_tokens(tokenizer) -> dict[str, int]:
    """Map ISO language codes to the ids of the tokenizer's language tokens (may be empty)."""
    found: dict[str, int] = {}
    for token, token_id in tokenizer.get_vocab().items():
        for pattern in _LANGUAGE_TOKEN_PATTERNS:
            match = pattern.match(token)
            if match:
                found.setdefault(match.group(1), token_id)
                break
    return found


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Family(ABC):
    """Base class: prompt tokens, stop tokens and one cached decoder step for one architecture."""

    name = "base"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = model.generation_config
        self.languages = language_tokens(tokenizer)
        # generate() stops on the generation config's EOS only; a None there means "never stop early".
        self.eos_token_ids = _as_list(self.generation_config.eos_token_id)
        pad = self.generation_config.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids or [0])[0]
        self.no_speech_token: int | None = None  # Whisper's <|nospeech|>: its probability after the start token

    # -- prompts -------------------------------------------------------------------------------
    def default_target(self) -> Target:
        return Target()

    @abstractmethod
    def prompt(self, target: Target) -> list[int]:
        """Decoder input ids that start the output for ``target`` (raises UnsupportedTarget)."""

    def check_language(self, code: str | None, role: str) -> None:
        if code is None or not self.languages or code in self.languages:
            return
        raise UnsupportedTarget(
            f"{role} language {code!r} is not supported by this model "
            f"(supported: {', '.join(sorted(self.languages))})"
        )

    @property
    def max_target_positions(self) -> int:
        return 448

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.get_text_config().vocab_size)

    def forced_prompt_tokens(self, prompt: list[int]) -> int:
        """How many prompt tokens ``generate`` forces through a logits processor rather than
        receiving as decoder input; they count against ``max_new_tokens`` there, so here too."""
        return 0

    def config_max_length(self, max_length: int, prompt: list[int]) -> int:
        """The total length ``generate`` allows when only the generation config's ``max_length`` is set."""
        return max_length

    def needs_detection(self, target: Target) -> bool:
        """Whether the source language of ``target`` must be detected from the audio first."""
        return False

    def check_target(self, target: Target) -> None:
        """Raise UnsupportedTarget if this model cannot produce ``target``."""
        if self.needs_detection(target):
            self.check_auto_source(target)
        else:
            self.prompt(target)

    # -- model calls -----------------------------------------------------------------------------
    def prepare_encoder_states(self, hidden: torch.Tensor, feature_mask: torch.Tensor | None):
        """Whatever is done once per encoder output before decoding (projection, mask downsampling)."""
        return hidden, None

    # Whether ``logits`` takes a decoder ``attention_mask`` over the cache and explicit ``position_ids``,
    # so rows of different lengths can share one lockstep (else they decode in groups of equal length).
    positions_and_mask = False

    @abstractmethod
    def logits(self, input_ids, encoder_states, encoder_mask, cache, last: int | list[int] = 1, **kwargs) -> torch.Tensor:
        """Run the decoder on the new ``input_ids`` with ``cache``; logits of the ``last`` positions
        (or of the positions of ``input_ids`` listed) as [batch, positions, vocab]: one position per
        step, a whole draft when verifying one."""

    def step(self, input_ids, encoder_states, encoder_mask, cache) -> torch.Tensor:
        """One decoder step: last-position logits [batch, vocab]."""
        return self.logits(input_ids, encoder_states, encoder_mask, cache)[:, -1]

    @property
    def fixed_window_s(self) -> float | None:
        """Seconds every encoder input is padded to (Whisper: 30), None when inputs are not padded."""
        return None

    def suppressed_tokens(self) -> tuple[list[int], list[int]]:
        """(always suppressed, suppressed at the first generated position)."""
        return (
            _as_list(self.generation_config.suppress_tokens),
            _as_list(self.generation_config.begin_suppress_tokens),
        )


class WhisperFamily(Family):
    name = "whisper"

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        config = self.generation_config
        lang_to_id = getattr(config, "lang_to_id", None) or {}
        if lang_to_id:  # the generation config is the reference for the model's languages
            self.languages = {tok.strip("<|>"): int(i) for tok, i in lang_to_id.items()}
        self.multilingual = bool(getattr(config, "is_multilingual", bool(self.languages)))
        task_to_id = getattr(config, "task_to_id", None) or {}
        self.task_ids = {k: int(v) for k, v in task_to_id.items()}
        self.start_token = int(config.decoder_start_token_id)
        self.no_timestamps_token = getattr(config, "no_timestamps_token_id", None)
        vocab = tokenizer.get_vocab()
        for name in ("<|nospeech|>", "<|nocaptions|>"):  # the token's name in newer / older checkpoints
            if name in vocab:
                self.no_speech_token = int(vocab[name])
                break
        self.prev_token = vocab.get("<|startofprev|>")  # starts the previous-text context (prompts)
        self._context_cache: dict[str, list[int]] = {}

    @property
    def max_target_positions(self) -> int:
        return int(self.model.config.max_target_positions)

    def config_max_length(self, max_length: int, prompt: list[int]) -> int:
        # WhisperGenerationMixin._set_max_new_tokens_and_length: the prompt does not count there.
        positions = self.max_target_positions
        return min(max_length + min(positions // 2 - 1, len(prompt)), positions)

    @property
    def fixed_window_s(self) -> float | None:
        return float(self.model.config.max_source_positions * 2 / 100)  # 1500 positions = 3000 mel frames = 30 s

    def encode_window(self, features: torch.Tensor) -> torch.Tensor:
        """WhisperEncoder.forward on a log-mel window shorter than 30 s: the same layers, with the
        positional embeddings sliced to the window (the stock forward insists on 3000 frames)."""
        import torch.nn.functional as F  # noqa: PLC0415 (this module stays importable without torch)

        encoder = self.model.model.encoder
        hidden = F.gelu(encoder.conv1(features))
        hidden = F.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
        for layer in encoder.layers:
            hidden = layer(hidden, None)
        return encoder.layer_norm(hidden)

    def default_target(self) -> Target:
        # Multilingual Whisper detects the spoken language per utterance, as generate() does.
        return Target() if self.multilingual else Target("en", "en")

    def needs_detection(self, target: Target) -> bool:
        return self.multilingual and target.source_lang is None

    def detection_prompt(self) -> list[int]:
        return [self.start_token]

    def check_auto_source(self, target: Target) -> None:
        """With the source left to detection only 'transcribe' or 'translate into English' are knowable."""
        if target.target_lang not in (None, "en"):
            raise UnsupportedTarget(
                f"Whisper cannot produce {target.target_lang!r} from speech of undetected language: give the "
                f"source language (target = source transcribes), or target 'en' to translate into English"
            )

    def with_detected_source(self, target: Target, language: str) -> Target:
        return Target(language, target.target_lang or language, target.prompt)

    def context_tokens(self, text: str) -> list[int]:
        """<|startofprev|> + the context's tokens, as ``WhisperTokenizer.get_prompt_ids`` makes them,
        keeping the last ``max_target_positions // 2 - 1`` (openai-whisper's and faster-whisper's cut)."""
        tokens = self._context_cache.get(text)
        if tokens is None:
            ids = self.tokenizer(" " + text.strip(), add_special_tokens=False).input_ids
            tokens = [self.prev_token] + ids[-(self.max_target_positions // 2 - 1):]
            if len(self._context_cache) > 256:  # one entry per distinct prompt; bounded for long uptimes
                self._context_cache.clear()
            self._context_cache[text] = tokens
        return tokens

    def prompt(self, target: Target) -> list[int]:
        if self.needs_detection(target):
            self.check_auto_source(target)
            raise UnsupportedTarget("internal: the source language must be detected before prompting")
        source = target.source_lang or "en"
        wanted = target.target_lang or source
        if not self.multilingual:
            if source != "en" or wanted != "en":
                raise UnsupportedTarget("this Whisper model is English-only (source and target must be 'en')")
            tokens = [self.start_token]
        else:
            self.check_language(source, "source")
            if wanted == source:
                task = "transcribe"
            elif wanted == "en":
                task = "translate"
            else:
                raise UnsupportedTarget(
                    f"Whisper cannot translate {source!r} into {wanted!r}: it transcribes "
                    f"(target = source) or translates into English (target = 'en')"
                )
            tokens = [self.start_token, self.languages[source], self.task_ids[task]]
        if self.no_timestamps_token is not None:
            tokens.append(int(self.no_timestamps_token))
        if target.prompt:
            if self.prev_token is None:
                raise UnsupportedTarget("this Whisper model has no <|startofprev|> token, so it takes no prompt")
            return self.context_tokens(target.prompt) + tokens
        return tokens

    positions_and_mask = True

    def logits(self, input_ids, encoder_states, encoder_mask, cache, last=1, attention_mask=None, position_ids=None):
        out = self.model.model.decoder(
            input_ids=input_ids, encoder_hidden_states=encoder_states, cache=cache, use_cache=True,
            attention_mask=attention_mask, position_ids=position_ids,
        )
        return project(self.model.proj_out, _positions(out.last_hidden_state, last))


class _StartTokenFamily(Family):
    """Families whose prompt is a start token plus, for multilingual decoders, a language token."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        start = self.generation_config.decoder_start_token_id
        if start is None:
            start = getattr(model.config, "decoder_start_token_id", None)
        if start is None:
            start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        if start is None:
            raise ValueError("the model defines no decoder_start_token_id and its tokenizer no [CLS]/BOS token")
        self.start_token = int(start)
        forced = self.generation_config.forced_bos_token_id
        self.default_forced_bos = int(forced) if forced is not None else None

    def default_target(self) -> Target:
        if self.default_forced_bos is not None:
            for code, token_id in self.languages.items():
                if token_id == self.default_forced_bos:
                    return Target(None, code)
        return Target()

    def prompt(self, target: Target) -> list[int]:
        self.check_language(target.source_lang, "source")
        if target.prompt:
            raise UnsupportedTarget("prompts and hotwords are previous-text context for Whisper; this model "
                                    "has no such input, so leave them out")
        if target.target_lang is None:
            forced = self.default_forced_bos
        elif self.languages:
            self.check_language(target.target_lang, "target")
            forced = self.languages[target.target_lang]
        else:
            raise UnsupportedTarget(
                f"this model has no target-language tokens: it produces one fixed language, "
                f"so target {target.target_lang!r} cannot be chosen (omit the target language)"
            )
        return [self.start_token] if forced is None else [self.start_token, forced]

    def forced_prompt_tokens(self, prompt: list[int]) -> int:
        return len(prompt) - 1  # the forced language BOS


class Speech2TextFamily(_StartTokenFamily):
    name = "speech_to_text"

    @property
    def max_target_positions(self) -> int:
        return int(self.model.config.max_target_positions)

    def prepare_encoder_states(self, hidden, feature_mask):
        if feature_mask is None:
            return hidden, None
        return hidden, self.model.model._get_feature_vector_attention_mask(hidden.shape[1], feature_mask)

    def logits(self, input_ids, encoder_states, encoder_mask, cache, last=1):
        out = self.model.model.decoder(
            input_ids=input_ids,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=encoder_mask,
            cache=cache,
            use_cache=True,
        )
        return project(self.model.lm_head, _positions(out.last_hidden_state, last))


class SpeechEncoderDecoderFamily(_StartTokenFamily):
    name = "speech_encoder_decoder"

    @property
    def max_target_positions(self) -> int:
        decoder_config = self.model.decoder.config
        return int(getattr(decoder_config, "max_position_embeddings", None) or getattr(decoder_config, "n_positions", 512))

    def prepare_encoder_states(self, hidden, feature_mask):
        # Mirrors SpeechEncoderDecoderModel.forward, done once instead of at every step.
        model = self.model
        if (
            model.encoder_output_dim != model.decoder.config.hidden_size
            and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None
        ):
            hidden = model.enc_to_dec_proj(hidden)
        mask = None
        if feature_mask is not None:
            mask = model.encoder._get_feature_vector_attention_mask(hidden.shape[1], feature_mask)
        return hidden, mask

    def logits(self, input_ids, encoder_states, encoder_mask, cache, last=1):
        out = self.model.decoder(
            input_ids=input_ids,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=encoder_mask,
            cache=cache,
            use_cache=True,
        )
        return _positions(out.logits, last)


FAMILIES = {
    "whisper": WhisperFamily,
    "speech_to_text": Speech2TextFamily,
    "speech-encoder-decoder": SpeechEncoderDecoderFamily,
}


def family_for(model, tokenizer) -> Family:
    model_type = model.config.model_type
    try:
        return FAMILIES[model_type](model, tokenizer)
    except KeyError:
        raise ValueError(
            f"unsupported model type {model_type!r}: streamsed serves Whisper, Speech2Text and "
            f"SpeechEncoderDecoder models"
        ) from None
