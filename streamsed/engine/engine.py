"""The inference engine: encode audio once, then KV-cached greedy decoding over many rows.

``Engine.encode`` runs the feature extractor and the speech encoder on a batch of utterances.
``Engine.decode`` then greedy-decodes any number of *rows* against that output: a row is
(utterance index, Target), so several targets of one utterance share one encoder pass. All rows
advance in lockstep with one ``EncoderDecoderCache``: cross-attention K/V are computed at the first
step and reused, self-attention K/V grow by one position per step, and a row that emits EOS is
pruned from the batch (and from the cache) so finished rows cost nothing.

The output is token-for-token what ``model.generate(num_beams=1, do_sample=False)`` returns for the
same encoder input; ``tests/test_engine_parity.py`` holds the engine to that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    ForcedEOSTokenLogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from ..core.languages import Target, UnsupportedTarget
from .families import Family, family_for

__all__ = ["Engine", "EncodedBatch", "Hypothesis", "Target", "UnsupportedTarget", "DecodeStats", "DecodeInterrupted"]


GENERATE_DEFAULT_NEW_TOKENS = 20  # transformers' default when neither max_length nor max_new_tokens is set


class DecodeInterrupted(Exception):
    """``decode`` gave up between two steps because its ``should_stop`` callback said so."""


@dataclass
class EncodedBatch:
    """Encoder output for a batch of utterances, already prepared for cross-attention."""

    states: torch.Tensor  # [batch, frames, hidden]
    mask: torch.Tensor | None  # [batch, frames] or None when nothing is padded
    durations: list[float]  # seconds of audio per utterance

    def __len__(self) -> int:
        return self.states.shape[0]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, without prompt and EOS
    text: str
    target: Target


@dataclass
class DecodeStats:
    """Counters of the last decode call, for benchmarks and batching tests."""

    steps: int = 0  # decoder forward passes
    rows: int = 0  # rows decoded
    tokens: int = 0  # tokens generated over all rows
    seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # active rows at each step


class Engine:
    """Owns one model on one device. Not thread-safe: one worker thread drives it."""

    def __init__(self, model, feature_extractor, tokenizer, *, name: str, device: torch.device, dtype: torch.dtype):
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.family: Family = family_for(model, tokenizer)
        self.name = name
        self.device = device
        self.dtype = dtype
        self.sample_rate = int(getattr(feature_extractor, "sampling_rate", 16000))
        self.last_stats = DecodeStats()
        self._input_name = feature_extractor.model_input_names[0]

    # -- facts the pipeline needs -------------------------------------------------------------------
    @property
    def max_window_s(self) -> float | None:
        """Longest audio the encoder accepts in one pass (Whisper: 30 s), None if unbounded."""
        chunk = getattr(self.feature_extractor, "chunk_length", None)
        return float(chunk) if self.family.name == "whisper" and chunk else None

    @property
    def languages(self) -> list[str]:
        return sorted(self.family.languages)

    def default_target(self) -> Target:
        return self.family.default_target()

    def check_target(self, target: Target) -> None:
        """Raise UnsupportedTarget with a clear message if the model cannot produce ``target``."""
        self.family.check_target(target)

    # -- encoder ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, audios: list[np.ndarray]) -> EncodedBatch:
        """Run the encoder once over float32 mono utterances at ``self.sample_rate``."""
        if not audios:
            raise ValueError("encode() needs at least one utterance")
        inputs = self.feature_inputs(audios)
        features = inputs[self._input_name].to(self.device, self.dtype)
        feature_mask = inputs.get("attention_mask")
        if feature_mask is not None:
            feature_mask = feature_mask.to(self.device)
        encoder = self.model.get_encoder()
        kwargs = {"attention_mask": feature_mask} if feature_mask is not None else {}
        hidden = encoder(features, **kwargs).last_hidden_state
        states, mask = self.family.prepare_encoder_states(hidden, feature_mask)
        return EncodedBatch(states, mask, [len(a) / self.sample_rate for a in audios])

    def feature_inputs(self, audios: list[np.ndarray]):
        """Feature-extractor output exactly as a user would pass it to ``model.generate``."""
        kwargs = {"sampling_rate": self.sample_rate, "return_tensors": "pt"}
        if self.family.name != "whisper":  # Whisper pads every input to its 30 s window itself
            kwargs["padding"] = True
        return self.feature_extractor([np.asarray(a, dtype=np.float32) for a in audios], **kwargs)

    # -- decoder ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(
        self,
        encoded: EncodedBatch,
        rows: list[tuple[int, Target]],
        max_new_tokens: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Hypothesis]:
        """Greedy-decode each (utterance index, target) row; results come back in row order.

        ``should_stop`` is polled before every decoder step; when it returns True the decode raises
        DecodeInterrupted (the worker uses it to drop disposable partials when a final is waiting).
        """
        for _, target in rows:  # validate every target before any model work
            self.family.check_target(target)
        stats = DecodeStats(rows=len(rows))
        started = time.perf_counter()
        rows = self._with_detected_languages(encoded, rows, stats)
        prompts = [self.family.prompt(target) for _, target in rows]
        tokens: list[list[int]] = [[] for _ in rows]
        by_prompt_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_prompt_length.setdefault(len(prompt), []).append(i)
        for row_ids in by_prompt_length.values():  # lockstep needs equal lengths; one group in practice
            utterances = torch.tensor([rows[i][0] for i in row_ids], device=self.device)
            mask = encoded.mask.index_select(0, utterances) if encoded.mask is not None else None
            generated = self._greedy(
                encoded.states.index_select(0, utterances), mask, [prompts[i] for i in row_ids],
                max_new_tokens, stats, should_stop,
            )
            for i, seq in zip(row_ids, generated):
                tokens[i] = seq
        stats.tokens = sum(len(t) for t in tokens)
        stats.seconds = time.perf_counter() - started
        self.last_stats = stats
        return [
            Hypothesis(seq, self.tokenizer.decode(seq, skip_special_tokens=True).strip(), target)
            for seq, (_, target) in zip(tokens, rows)  # targets with the detected source language
        ]

    def detect_languages(self, encoded: EncodedBatch, utterances: list[int], stats: DecodeStats | None = None) -> list[str]:
        """Whisper's language identification: one decoder step on <|startoftranscript|>, argmax over
        the language tokens (what ``generate(language=None)`` does)."""
        index = torch.tensor(utterances, device=self.device)
        states = encoded.states.index_select(0, index)
        mask = encoded.mask.index_select(0, index) if encoded.mask is not None else None
        prompt = torch.tensor([self.family.detection_prompt()] * len(utterances), device=self.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits = self.family.step(prompt, states, mask, cache).float()
        if stats is not None:
            stats.steps += 1
            stats.batch_sizes.append(len(utterances))
        codes = list(self.family.languages)
        ids = torch.tensor([self.family.languages[c] for c in codes], device=self.device)
        return [codes[i] for i in logits.index_select(1, ids).argmax(dim=-1).tolist()]

    def _with_detected_languages(self, encoded, rows, stats):
        """Rows whose source language is left to the model get it filled in by detection."""
        pending = sorted({u for u, target in rows if self.family.needs_detection(target)})
        if not pending:
            return rows
        detected = dict(zip(pending, self.detect_languages(encoded, pending, stats)))
        family = self.family
        return [(u, family.with_detected_source(t, detected[u]) if family.needs_detection(t) else t) for u, t in rows]

    def transcribe(self, audios: list[np.ndarray], targets: list[Target], max_new_tokens: int | None = None):
        """Encode ``audios`` once and decode every target of each; returns [utterance][target]."""
        encoded = self.encode(audios)
        rows = [(u, t) for u in range(len(audios)) for t in targets]
        hyps = self.decode(encoded, rows, max_new_tokens)
        return [hyps[u * len(targets) : (u + 1) * len(targets)] for u in range(len(audios))]

    def _greedy(self, states, mask, prompts, max_new_tokens, stats, should_stop=None) -> list[list[int]]:
        prompt_length = len(prompts[0])
        # generate() counts its decoder input (our prompt minus the forced tokens) in max_length.
        input_length = prompt_length - self.family.forced_prompt_tokens(prompts[0])
        config = self.family.generation_config
        max_new_tokens = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
        if max_new_tokens is not None:
            max_length = input_length + max_new_tokens
        elif config.max_length is not None:
            max_length = config.max_length
        else:  # generate()'s default when a config sets no length: 20 new tokens
            max_length = input_length + GENERATE_DEFAULT_NEW_TOKENS
        max_length = min(max_length, self.family.max_target_positions)
        max_new = max(max_length - prompt_length, 0)
        processors = self._logits_processors(prompt_length, input_length, max_length)
        eos = torch.tensor(self.family.eos_token_ids, device=self.device)

        sequences = torch.tensor(prompts, device=self.device)  # full sequences of the live rows
        live = list(range(len(prompts)))  # original position of each live row
        results: list[list[int]] = [[] for _ in prompts]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        step_input = sequences
        for _ in range(max_new):
            if should_stop is not None and should_stop():
                raise DecodeInterrupted(f"stopped after {stats.steps} decoder steps")
            logits = self.family.step(step_input, states, mask, cache).float()
            stats.steps += 1
            stats.batch_sizes.append(len(live))
            next_tokens = processors(sequences, logits).argmax(dim=-1)
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            finished = torch.isin(next_tokens, eos)
            for row, token, done in zip(live, next_tokens.tolist(), finished.tolist()):
                if not done:
                    results[row].append(token)
            if bool(finished.all()):
                break
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                states = states.index_select(0, keep)
                mask = mask.index_select(0, keep) if mask is not None else None
                sequences = sequences.index_select(0, keep)
                next_tokens = next_tokens.index_select(0, keep)
                live = [live[i] for i in keep.tolist()]
            step_input = next_tokens[:, None]
        return results

    def _logits_processors(self, prompt_length: int, input_length: int, max_length: int) -> LogitsProcessorList:
        """The greedy-relevant processors ``generate`` builds from the generation config.

        ``input_length`` is the decoder input generate() starts from (the prompt without forced
        tokens); begin-suppression applies at the first free position, after the whole prompt.
        """
        config = self.family.generation_config
        eos = self.family.eos_token_ids
        suppress, begin_suppress = self.family.suppressed_tokens()
        processors = LogitsProcessorList()
        if config.repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if config.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
        if config.min_length and eos:
            processors.append(MinLengthLogitsProcessor(config.min_length, eos, device=self.device))
        if config.min_new_tokens and eos:
            processors.append(MinNewTokensLengthLogitsProcessor(input_length, config.min_new_tokens, eos, device=self.device))
        if suppress:
            processors.append(SuppressTokensLogitsProcessor(suppress, device=self.device))
        if begin_suppress:
            processors.append(SuppressTokensAtBeginLogitsProcessor(begin_suppress, prompt_length, device=self.device))
        if config.forced_eos_token_id is not None:
            processors.append(ForcedEOSTokenLogitsProcessor(max_length, config.forced_eos_token_id, device=self.device))
        return processors
