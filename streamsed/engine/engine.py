"""The inference engine: encode audio once, then KV-cached greedy decoding over many rows.

``Engine.encode`` runs the feature extractor and the speech encoder on a batch of utterances.
``Engine.decode`` then greedy-decodes any number of *rows* against that output: a row is
(utterance index, Target), so several targets of one utterance share one encoder pass. All rows
advance in lockstep with one ``EncoderDecoderCache``: cross-attention K/V are computed at the first
step and reused, self-attention K/V grow by one position per step, and a row that emits EOS is
pruned from the batch (and from the cache) so finished rows cost nothing.

The output is token-for-token what ``model.generate(num_beams=1, do_sample=False)`` returns for the
same encoder input; ``tests/test_engine_parity.py`` holds the engine to that, with and without
*drafts*: a guess at a row's tokens (a stream's previous partial) is verified in one decoder forward
and only the prefix greedy decoding itself confirms is kept, which saves steps and changes nothing.
A row decoding alone (a CPU lane's final) then realigns the rest of its draft with the token greedy
chose instead (one misheard, missing or extra word) and verifies that too, in one more forward.

``encode(window="fast")`` gives Whisper a log-mel window cut to the audio plus ``window_margin_s``
instead of its 30 s one: not generate()'s input any more, about a quarter of the encoder time, and
``run_rows`` redoes a fast result on the exact window when it comes back broken.
"""

from __future__ import annotations

import copy
import itertools
import math
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
)

from ..core.guard import compression_ratio
from ..core.languages import Target, UnsupportedTarget
from .families import Family, family_for
from .suppression import SuppressTokens, SuppressTokensAtBegin

__all__ = ["Engine", "EncodedBatch", "Hypothesis", "Target", "UnsupportedTarget", "DecodeStats", "DecodeInterrupted",
           "WINDOWS", "run_rows", "compression_ratio",
           "quantize_linears"]


GENERATE_DEFAULT_NEW_TOKENS = 20  # transformers' default when neither max_length nor max_new_tokens is set
WINDOWS = ("exact", "fast", "auto")
DEFAULT_WINDOW_MARGIN_S = 5.0
# A fast-window result whose text compresses better than this is a repetition loop (openai-whisper's
# compression_ratio_threshold); the request is then decoded again on the exact window.
LOOP_COMPRESSION_RATIO = 2.4


class DecodeInterrupted(Exception):
    """``decode`` gave up between two steps because its ``should_stop`` callback said so."""


@dataclass
class EncodedBatch:
    """Encoder output for a batch of utterances, already prepared for cross-attention.

    ``states`` is padded to the longest window of the batch; ``frames[u]`` says how many of its
    frames belong to utterance ``u`` (a fast window is cut to each utterance's own length, so its
    output never depends on what else is in the batch).
    """

    states: torch.Tensor  # [batch, frames, hidden]
    mask: torch.Tensor | None  # [batch, frames] or None when nothing is padded
    durations: list[float]  # seconds of audio per utterance
    window: str = "exact"  # "exact" (the model's own input) or "fast" (trimmed window)
    frames: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.frames:
            self.frames = [self.states.shape[1]] * self.states.shape[0]

    def __len__(self) -> int:
        return self.states.shape[0]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, without prompt and EOS
    text: str
    target: Target
    window: str = "exact"
    finished: bool = True  # False when the length limit, not EOS, ended it
    draft_offered: int = 0  # draft tokens given for this row
    draft_accepted: int = 0  # of those, how many the model's own greedy choice confirmed
    queued_ms: int = 0  # set by the worker: wait before its batch started
    compute_ms: int = 0  # set by the worker: run time of its batch
    # Mean log-probability of the tokens and the final EOS (openai-whisper's avg_logprob), from the
    # scores after generate()'s logits processors.
    avg_logprob: float | None = None
    # Whisper: probability of <|nospeech|> right after <|startoftranscript|> (None for other models).
    no_speech_prob: float | None = None
    # With word_timings (Whisper with alignment heads): [{"word", "start", "end"}], seconds from the
    # utterance start; None when not asked for or not available.
    words: list[dict] | None = None

    @property
    def looks_broken(self) -> bool:
        """A repetition loop: text that gzip compresses more than ``LOOP_COMPRESSION_RATIO``."""
        return compression_ratio(self.text) > LOOP_COMPRESSION_RATIO


@dataclass
class DecodeStats:
    """Counters of the last decode call, for benchmarks and batching tests."""

    steps: int = 0  # decoder forward passes
    rows: int = 0  # rows decoded
    tokens: int = 0  # tokens generated over all rows
    seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # active rows at each step
    draft_offered: int = 0  # draft tokens given, over all rows
    draft_accepted: int = 0  # draft tokens the greedy choice confirmed


def quantize_linears(model):
    """Replace every nn.Linear of ``model`` (in place) by torch.ao's dynamically quantized int8 Linear:
    int8 weights, activations quantized per batch; CPU only. Returns the model."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch marks its quantized tensor API as deprecated
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model.eval(), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


class Engine:
    """Owns one model on one device. Not thread-safe: one worker thread drives it (a second
    thread gets its own ``replica()``)."""

    def __init__(self, model, feature_extractor, tokenizer, *, name: str, device: torch.device, dtype: torch.dtype,
                 window_margin_s: float = DEFAULT_WINDOW_MARGIN_S):
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.family: Family = family_for(model, tokenizer)
        self.name = name
        self.device = device
        self.dtype = dtype
        self.window_margin_s = window_margin_s
        self.quantized: str | None = None  # "int8" when the Linear layers are dynamically quantized
        self.sample_rate = int(getattr(feature_extractor, "sampling_rate", 16000))
        self.last_stats = DecodeStats()
        self.static_decoder = None  # a StaticDecoder once enable_static_decoding() ran (CUDA graphs)
        self._input_name = feature_extractor.model_input_names[0]

    def replica(self) -> Engine:
        """A second Engine on the same weights, for another worker lane (thread).

        Module objects, config, tokenizer and stats are its own (word timings switch the attention
        implementation of their model for one call, and decoding records ``last_stats``); parameter
        and buffer tensors are shared, so a replica costs little memory and gives identical outputs.
        """
        if self.static_decoder is not None:
            raise ValueError("an engine decoding on a static cache (CUDA graphs) has no replicas")
        shared = list(itertools.chain(self.model.parameters(), self.model.buffers()))
        # int8 Linear layers keep their weights in packed-params objects, read-only at inference.
        shared += [m._packed_params for m in self.model.modules()
                   if hasattr(m, "_packed_params") and not isinstance(m._packed_params, torch.nn.Module)]
        model = copy.deepcopy(self.model, memo={id(obj): obj for obj in shared})
        twin = Engine(model, self.feature_extractor, copy.deepcopy(self.tokenizer), name=self.name,
                      device=self.device, dtype=self.dtype, window_margin_s=self.window_margin_s)
        twin.quantized = self.quantized
        return twin

    def int8_twin(self) -> Engine:
        """This model with every nn.Linear dynamically quantized to int8 (CPU), for work where speed
        counts more than the last WER point: partials, which the final replaces anyway.

        Everything that is not a Linear layer (embeddings, convolutions, norms) stays this engine's
        own float32 tensors, shared, so the twin costs only its int8 weights. Its output differs
        from this engine's (README "CPU int8" has the measured WER)."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or self.quantized:
            raise ValueError(f"an int8 twin needs a float32 engine on the CPU, not {self.dtype} on {self.device}"
                             + (" (already int8)" if self.quantized else ""))
        shared = itertools.chain(self.model.parameters(), self.model.buffers())
        model = quantize_linears(copy.deepcopy(self.model, memo={id(tensor): tensor for tensor in shared}))
        twin = Engine(model, self.feature_extractor, copy.deepcopy(self.tokenizer), name=self.name,
                      device=self.device, dtype=self.dtype, window_margin_s=self.window_margin_s)
        twin.quantized = "int8"
        return twin

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

    def language_name(self, code: str | None) -> str | None:
        """Whisper's English name of a language code ("de" -> "german", as OpenAI's API reports it)."""
        if code is None or self.family.name != "whisper":
            return code
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        return LANGUAGES.get(code, code)

    def check_target(self, target: Target) -> None:
        """Raise UnsupportedTarget with a clear message if the model cannot produce ``target``."""
        self.family.check_target(target)

    def frame_classifier(self, vad):
        """A fresh voice-activity classifier for one stream (``[vad] engine``: Silero or webrtcvad)."""
        from .voice import frame_classifier

        return frame_classifier(vad)

    @staticmethod
    def vad_stats() -> dict:
        """CPU time Silero VAD took per second of audio it classified, over the whole process."""
        from .voice import VAD_STATS

        ms = VAD_STATS.ms_per_audio_second
        return {"cpu_seconds": round(VAD_STATS.cpu_seconds, 3), "audio_seconds": round(VAD_STATS.audio_seconds, 1),
                "ms_per_audio_second": round(ms, 2) if ms is not None else None}

    def resolve_window(self, window: str) -> str:
        """The window a setting means here: ``auto`` is fast on CPU and exact on CUDA; models whose
        inputs are not padded to a fixed window (wav2vec2, HuBERT) only have the exact one."""
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
        if self.family.fixed_window_s is None:
            return "exact"
        if window == "auto":
            return "exact" if self.device.type == "cuda" else "fast"
        return window

    def window_frames(self, samples: int) -> int:
        """Log-mel frames of the fast window: the audio plus the margin, rounded up to a whole
        second (so that utterances of similar length share one encoder call), capped at 30 s."""
        hop = int(getattr(self.feature_extractor, "hop_length", 160))
        per_second = self.sample_rate // hop
        total = int(self.family.fixed_window_s * per_second)
        seconds = math.ceil(samples / self.sample_rate + self.window_margin_s)
        return min(total, max(seconds, 1) * per_second)

    def enable_static_decoding(self, compile_mode: str | None = "reduce-overhead", backend: str = "inductor") -> None:
        """Decode Whisper on a static KV cache, its step compiled (CUDA graphs with the default
        ``reduce-overhead``); ``compile_mode=None`` keeps the static cache but runs eagerly."""
        if self.family.name != "whisper":
            raise ValueError(f"static decoding is built for Whisper, not {self.family.name}")
        from .static_decode import StaticDecoder

        self.static_decoder = StaticDecoder(self, compile_mode, backend)

    # -- encoder ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, audios: list[np.ndarray], window: str = "exact") -> EncodedBatch:
        """Run the encoder once over float32 mono utterances at ``self.sample_rate``.

        ``window="exact"`` gives the encoder exactly what ``generate()`` gives it; ``"fast"`` (Whisper)
        cuts the 30 s log-mel window to each utterance plus ``window_margin_s``.
        """
        if not audios:
            raise ValueError("encode() needs at least one utterance")
        window = self.resolve_window(window)
        inputs = self.feature_inputs(audios)
        features = inputs[self._input_name].to(self.device, self.dtype)
        durations = [len(a) / self.sample_rate for a in audios]
        if window == "fast":
            return self._encode_fast(features, [len(a) for a in audios], durations)
        feature_mask = inputs.get("attention_mask")
        if feature_mask is not None:
            feature_mask = feature_mask.to(self.device)
        encoder = self.model.get_encoder()
        kwargs = {"attention_mask": feature_mask} if feature_mask is not None else {}
        hidden = encoder(features, **kwargs).last_hidden_state
        states, mask = self.family.prepare_encoder_states(hidden, feature_mask)
        return EncodedBatch(states, mask, durations)

    def _encode_fast(self, features: torch.Tensor, lengths: list[int], durations: list[float]) -> EncodedBatch:
        """One encoder call per distinct window length; each utterance's output is its own."""
        mel_frames = [min(self.window_frames(n), features.shape[-1]) for n in lengths]
        outputs: list[torch.Tensor | None] = [None] * len(lengths)
        for frames in sorted(set(mel_frames)):
            members = [u for u, f in enumerate(mel_frames) if f == frames]
            index = torch.tensor(members, device=features.device)
            hidden = self.family.encode_window(features.index_select(0, index)[..., :frames])
            for u, states in zip(members, hidden):
                outputs[u] = states
        longest = max(o.shape[0] for o in outputs)
        states = torch.zeros(len(outputs), longest, outputs[0].shape[-1], dtype=outputs[0].dtype, device=features.device)
        for u, output in enumerate(outputs):
            states[u, : output.shape[0]] = output
        return EncodedBatch(states, None, durations, "fast", [o.shape[0] for o in outputs])

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
        drafts: list[list[int] | None] | None = None,
    ) -> list[Hypothesis]:
        """Greedy-decode each (utterance index, target) row; results come back in row order.

        ``drafts[i]`` (optional) is a guess at row ``i``'s tokens, e.g. the previous partial's. It is
        verified in one batched forward and only the prefix that greedy decoding itself would produce
        is kept, so the tokens are the same with any draft, right, wrong or empty; a good draft only
        saves decoder steps.

        ``should_stop`` is polled before every decoder step; when it returns True the decode raises
        DecodeInterrupted (the worker uses it to drop disposable partials when a final is waiting).
        """
        for _, target in rows:  # validate every target before any model work
            self.family.check_target(target)
        if drafts is not None and len(drafts) != len(rows):
            raise ValueError(f"{len(drafts)} drafts for {len(rows)} rows")
        stats = DecodeStats(rows=len(rows))
        started = time.perf_counter()
        rows = self._with_detected_languages(encoded, rows, stats)
        prompts = [self.family.prompt(target) for _, target in rows]
        results: list[_Row] = [_Row() for _ in rows]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (utterance, _) in enumerate(rows):  # lockstep needs equal prompt and window lengths
            groups.setdefault((len(prompts[i]), encoded.frames[utterance]), []).append(i)
        for (_, frames), row_ids in groups.items():
            utterances = torch.tensor([rows[i][0] for i in row_ids], device=self.device)
            mask = encoded.mask.index_select(0, utterances) if encoded.mask is not None else None
            group_drafts = [list((drafts or [None] * len(rows))[i] or []) for i in row_ids]
            decoded = self._greedy(
                encoded.states.index_select(0, utterances)[:, :frames], mask, [prompts[i] for i in row_ids],
                max_new_tokens, stats, should_stop, group_drafts,
            )
            for i, row in zip(row_ids, decoded):
                results[i] = row
        stats.tokens = sum(len(r.tokens) for r in results)
        stats.seconds = time.perf_counter() - started
        self.last_stats = stats
        return [
            Hypothesis(r.tokens, self.tokenizer.decode(r.tokens, skip_special_tokens=True).strip(), target,
                       encoded.window, r.finished, r.draft_offered, r.draft_accepted,
                       avg_logprob=r.avg_logprob, no_speech_prob=r.no_speech_prob)
            for r, (_, target) in zip(results, rows)  # targets with the detected source language
        ]

    def detect_languages(self, encoded: EncodedBatch, utterances: list[int], stats: DecodeStats | None = None) -> list[str]:
        """Whisper's language identification: one decoder step on <|startoftranscript|>, argmax over
        the language tokens (what ``generate(language=None)`` does)."""
        codes = list(self.family.languages)
        ids = torch.tensor([self.family.languages[c] for c in codes], device=self.device)
        detected: dict[int, str] = {}
        for frames in sorted({encoded.frames[u] for u in utterances}):
            members = [u for u in utterances if encoded.frames[u] == frames]
            index = torch.tensor(members, device=self.device)
            states = encoded.states.index_select(0, index)[:, :frames]
            mask = encoded.mask.index_select(0, index) if encoded.mask is not None else None
            prompt = torch.tensor([self.family.detection_prompt()] * len(members), device=self.device)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            logits = self.family.step(prompt, states, mask, cache).float()
            if stats is not None:
                stats.steps += 1
                stats.batch_sizes.append(len(members))
            for u, best in zip(members, logits.index_select(1, ids).argmax(dim=-1).tolist()):
                detected[u] = codes[best]
        return [detected[u] for u in utterances]

    def _with_detected_languages(self, encoded, rows, stats):
        """Rows whose source language is left to the model get it filled in by detection."""
        pending = sorted({u for u, target in rows if self.family.needs_detection(target)})
        if not pending:
            return rows
        detected = dict(zip(pending, self.detect_languages(encoded, pending, stats)))
        family = self.family
        return [(u, family.with_detected_source(t, detected[u]) if family.needs_detection(t) else t) for u, t in rows]

    def transcribe(self, audios: list[np.ndarray], targets: list[Target], max_new_tokens: int | None = None,
                   window: str = "exact"):
        """Encode ``audios`` once and decode every target of each; returns [utterance][target]."""
        rows = [(u, t) for u in range(len(audios)) for t in targets]
        hyps = run_rows(self, audios, rows, window=window, max_new_tokens=max_new_tokens)
        return [hyps[u * len(targets) : (u + 1) * len(targets)] for u in range(len(audios))]

    def _length_budget(self, prompt: list[int], max_new_tokens: int | None) -> tuple[int, int]:
        """(max_length, new tokens allowed) exactly as generate() computes them for this prompt."""
        prompt_length = len(prompt)
        # generate() counts its decoder input (our prompt minus the forced tokens) in max_length.
        input_length = prompt_length - self.family.forced_prompt_tokens(prompt)
        config = self.family.generation_config
        max_new_tokens = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
        if max_new_tokens is not None:
            max_length = input_length + max_new_tokens
        elif config.max_length is not None:
            max_length = self.family.config_max_length(config.max_length, prompt)
        else:  # generate()'s default when a config sets no length: 20 new tokens
            max_length = input_length + GENERATE_DEFAULT_NEW_TOKENS
        max_length = min(max_length, self.family.max_target_positions)
        return max_length, max(max_length - prompt_length, 0)

    def _greedy(self, states, mask, prompts, max_new_tokens, stats, should_stop=None, drafts=None) -> list[_Row]:
        prompt_length = len(prompts[0])
        input_length = prompt_length - self.family.forced_prompt_tokens(prompts[0])
        max_length, max_new = self._length_budget(prompts[0], max_new_tokens)
        processors = self._logits_processors(prompt_length, input_length, max_length)
        eos = torch.tensor(self.family.eos_token_ids, dtype=torch.long, device=self.device)
        results = [_Row() for _ in prompts]
        vocab = self.family.vocab_size
        drafts = [_valid_prefix(d, vocab)[:max_new] for d in drafts] if drafts else [[] for _ in prompts]
        for row, draft in zip(results, drafts):
            row.draft_offered = len(draft)
        loop = _Loop(self, processors, eos, stats, should_stop)
        if not any(drafts) or max_new == 0:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            sequences = torch.tensor(prompts, device=self.device)
            loop.run(states, mask, sequences, sequences, cache, list(range(len(prompts))), results, max_new)
            return results
        # Verify every row's draft in one forward over prompt + draft (right-padded: the decoder is
        # causal, so padding after a row's draft cannot change the logits of its real positions).
        loop.check_stop()
        longest = max(len(d) for d in drafts)
        pad = self.family.pad_token_id
        inputs = torch.tensor([p + d + [pad] * (longest - len(d)) for p, d in zip(prompts, drafts)], device=self.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        # logits[:, j] predicts draft token j
        logits = loop.first_logits(inputs, states, mask, cache, prompts[0], list(range(len(prompts))), results).float()
        stats.steps += 1
        stats.batch_sizes.append(len(prompts))
        eos_ids = set(self.family.eos_token_ids)
        continuing: dict[int, list[tuple[int, int]]] = {}  # accepted length -> [(row, next token)]
        for r, (prompt, draft) in enumerate(zip(prompts, drafts)):
            accepted, token, logprob = self._accept(processors, prompt, draft, logits[r], max_new, eos_ids)
            results[r].logprob_sum += logprob
            results[r].tokens = draft[:accepted]
            results[r].draft_accepted = accepted
            stats.draft_offered += len(draft)
            stats.draft_accepted += accepted
            if token is None:  # EOS chosen (or nothing left to choose): the row is done
                results[r].finished = accepted < max_new
                continue
            results[r].tokens.append(token)
            if accepted + 1 >= max_new:
                results[r].finished = False
                continue
            continuing.setdefault(accepted, []).append((r, token))
        if len(continuing) > 1 and self.family.positions_and_mask:
            # Rows accepted different lengths: all of them go on in one lockstep over the verified
            # cache, each row masking the cache slots past its own accepted prefix and placing its
            # next token at its own position.
            members = sorted((r, accepted) for accepted, rows_ in continuing.items() for r, _ in rows_)
            index = torch.tensor([r for r, _ in members], device=self.device)
            longest = max(accepted for _, accepted in members)
            valid = torch.zeros(len(members), prompt_length + longest, dtype=torch.long, device=self.device)
            for i, (_, accepted) in enumerate(members):
                valid[i, : prompt_length + accepted] = 1
            ragged = _Ragged(
                sequences=[prompts[r] + results[r].tokens for r, _ in members], attention=valid,
                positions=torch.tensor([[prompt_length + a] for _, a in members], device=self.device),
                budgets=[max_new - a - 1 for _, a in members],
            )
            group_mask = mask.index_select(0, index) if mask is not None else None
            loop.run_ragged(states.index_select(0, index), group_mask, _select_cache(cache, index, prompt_length + longest),
                            ragged, [r for r, _ in members], results)
            return results
        # Rows that accepted the same number of tokens share a cache length: each such group goes on
        # step by step in lockstep from its own copy of the verified cache, cut to that length.
        for accepted, members in sorted(continuing.items()):
            index = torch.tensor([r for r, _ in members], device=self.device)
            group_cache = _select_cache(cache, index, prompt_length + accepted)
            group_states = states.index_select(0, index)
            group_mask = mask.index_select(0, index) if mask is not None else None
            if len(members) == 1 and self.static_decoder is None:  # a lone row: realign the rest of its draft
                r = members[0][0]
                if not self._follow_draft(loop, group_states, group_mask, group_cache, prompts[r], results[r],
                                          drafts[r], max_new, eos_ids):
                    continue
            sequences = torch.tensor([prompts[r] + results[r].tokens for r, _ in members], device=self.device)
            step_input = sequences[:, -1:]
            loop.run(group_states, group_mask, sequences, step_input, group_cache,
                     [r for r, _ in members], results, max_new - len(results[members[0][0]].tokens))
        return results

    def _follow_draft(self, loop, states, mask, cache, prompt, row: _Row, draft, max_new, eos_ids) -> bool:
        """After greedy decoding rejected a draft token, guess that the rest of the draft still
        follows (the partial misheard a word, or skipped or added one) and verify that guess in one
        more forward, for as long as that keeps confirming tokens; once it stops confirming, step
        plainly until greedy chooses a token the draft has further on. Every token is still greedy's own
        choice, so only the number of forwards changes. ``row`` holds the accepted prefix plus the
        token chosen instead; ``cache`` everything but that token. Returns whether the row goes on."""
        position, misses = row.draft_accepted, 0  # draft index of the rejected token
        furthest = position  # draft tokens [0, furthest) are already counted as accepted
        while position < len(draft):
            choice, room = row.tokens[-1], max_new - len(row.tokens)
            lost = misses >= 2
            start = _resume_at(draft, position, choice, lost=lost)
            # A lost draft's copy of the choice may be chance (",", " the"): a short guess costs
            # little more than a plain step; once it confirms, the next guess is the whole rest.
            guess = [] if start is None else draft[start : start + min(room, LOST_GUESS if lost else room)]
            if start is not None and not guess:
                return True
            loop.check_stop()
            inputs = torch.tensor([[choice] + guess], device=self.device)
            logits = self.family.logits(inputs, states, mask, cache, last=inputs.shape[1]).float()
            loop.stats.steps += 1
            loop.stats.batch_sizes.append(1)
            sequence = prompt + row.tokens
            got, token, logprob = self._accept(loop.processors, sequence, guess, logits[0], room, eos_ids)
            if got < len(guess):  # keep the choice and the guessed tokens greedy confirmed
                cache.crop(got - len(guess))
            row.logprob_sum += logprob
            row.tokens += guess[:got]
            if got:
                fresh = max(start + got - max(start, furthest), 0)  # a resumed guess may repeat draft tokens
                furthest = max(furthest, start + got)
                row.draft_accepted += fresh
                loop.stats.draft_accepted += fresh
            if token is None:
                row.finished = got < room
                return False
            row.tokens.append(token)
            if got + 1 >= room:
                row.finished = False
                return False
            if start is None or (lost and not got):  # a plain step, or a chance copy: the draft waits
                continue
            position, misses = start + got, (misses + 1 if got == 0 else 0)
        return True

    @staticmethod
    def _accept(processors, prompt, draft, logits, max_new, eos_ids) -> tuple[int, int | None, float]:
        """Greedy choices along a verified draft: (tokens of the draft accepted, the next token, or
        None when the row ends there, the log-probability of all the tokens chosen, EOS included).
        ``logits[j]`` predicts the token after prompt + draft[:j]."""
        sequence = torch.tensor([prompt + draft], device=logits.device)
        positions = min(len(draft), max_new - 1) + 1  # draft positions that can matter, plus the next
        scores = _batched_scores(processors, sequence, len(prompt), logits[:positions])
        accepted, logprob = 0, 0.0
        while accepted < max_new:
            if scores is not None:
                row = scores[accepted]
            else:
                row = processors(sequence[:, : len(prompt) + accepted], logits[accepted : accepted + 1])[0]
            choice = int(row.argmax())
            logprob += float(row.log_softmax(-1)[choice])
            if choice in eos_ids:
                return accepted, None, logprob
            if accepted < len(draft) and choice == draft[accepted]:
                accepted += 1
                continue
            return accepted, choice, logprob
        return accepted, None, logprob

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
            processors.append(SuppressTokens(suppress, device=self.device))
        if begin_suppress:
            processors.append(SuppressTokensAtBegin(begin_suppress, prompt_length, device=self.device))
        if config.forced_eos_token_id is not None:
            processors.append(ForcedEOSTokenLogitsProcessor(max_length, config.forced_eos_token_id, device=self.device))
        return processors


@dataclass
class _Row:
    """What decoding one row produced so far."""

    tokens: list[int] = field(default_factory=list)
    finished: bool = True
    draft_offered: int = 0
    draft_accepted: int = 0
    logprob_sum: float = 0.0  # of every chosen token, EOS included
    no_speech_prob: float | None = None

    @property
    def avg_logprob(self) -> float:
        return self.logprob_sum / (len(self.tokens) + 1)


class _Loop:
    """The step-by-step greedy loop shared by plain decoding and the continuation after a draft."""

    def __init__(self, engine: Engine, processors, eos, stats: DecodeStats, should_stop):
        self.family = engine.family
        self.processors = processors
        self.eos = eos
        self.stats = stats
        self.should_stop = should_stop
        self.static = engine.static_decoder

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise DecodeInterrupted(f"stopped after {self.stats.steps} decoder steps")

    def prompt_logits(self, step_input, states, mask, cache, live: list[int], results: list[_Row]) -> torch.Tensor:
        """The first forward of a plain decode, over the whole prompt: next-token logits [rows, vocab]."""
        return self.first_logits(step_input, states, mask, cache, step_input[0].tolist(), live, results)[:, -1]

    def first_logits(self, inputs, states, mask, cache, prompt: list[int], live: list[int], results: list[_Row]):
        """The first forward, over the prompt (and any draft after it): logits [rows, positions, vocab]
        of the positions from the prompt's last on, each predicting the next token. The logits at
        <|startoftranscript|> give each row's no-speech probability (openai-whisper's: softmax of the
        raw logits there) on the way; no other position is projected (the costliest part of a step)."""
        first = len(prompt) - 1
        wanted = list(range(first, inputs.shape[1]))
        start = getattr(self.family, "start_token", None)
        record = self.family.no_speech_token is not None and start in prompt
        if record and prompt.index(start) < first:
            wanted.insert(0, prompt.index(start))
        logits = self.family.logits(inputs, states, mask, cache, last=wanted)
        if record:
            at_start = logits[:, wanted.index(prompt.index(start))].float()
            for row, prob in zip(live, at_start.softmax(dim=-1)[:, self.family.no_speech_token].tolist()):
                results[row].no_speech_prob = prob
        return logits[:, len(wanted) - (inputs.shape[1] - first):]

    def add_logprobs(self, scores, tokens, live: list[int], results: list[_Row]) -> None:
        """Add each row's log-probability of its chosen token (scores: after the logits processors)."""
        chosen = scores.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
        for row, logprob in zip(live, chosen):
            results[row].logprob_sum += logprob

    def run(self, states, mask, sequences, step_input, cache, live: list[int], results: list[_Row], steps: int) -> None:
        """Decode up to ``steps`` more tokens for rows ``live`` (their full ``sequences`` so far);
        ``step_input`` is what the cache has not seen yet. Finished rows leave batch and cache."""
        if self.static is not None and mask is None:
            self.static.run(self, states, sequences, step_input, cache, live, results, steps)
            return
        for _ in range(steps):
            self.check_stop()
            if step_input.shape[1] > 1:
                logits = self.prompt_logits(step_input, states, mask, cache, live, results).float()
            else:
                logits = self.family.step(step_input, states, mask, cache).float()
            self.stats.steps += 1
            self.stats.batch_sizes.append(len(live))
            scores = self.processors(sequences, logits)
            next_tokens = scores.argmax(dim=-1)
            self.add_logprobs(scores, next_tokens, live, results)
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            finished = torch.isin(next_tokens, self.eos)
            for row, token, done in zip(live, next_tokens.tolist(), finished.tolist()):
                if not done:
                    results[row].tokens.append(token)
            if bool(finished.all()):
                return
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                states = states.index_select(0, keep)
                mask = mask.index_select(0, keep) if mask is not None else None
                sequences = sequences.index_select(0, keep)
                next_tokens = next_tokens.index_select(0, keep)
                live = [live[i] for i in keep.tolist()]
            step_input = next_tokens[:, None]
        for row in live:  # still going when the length limit struck
            results[row].finished = False

    def run_ragged(self, states, mask, cache, ragged: _Ragged, live: list[int], results: list[_Row]) -> None:
        """Like ``run`` for rows whose sequences differ in length (after a verified draft). Logits
        processors run row by row on each row's own sequence, as generate() would see it."""
        device = ragged.attention.device
        step_input = torch.tensor([[seq[-1]] for seq in ragged.sequences], device=device)
        eos = set(self.eos.tolist())
        while live:
            self.check_stop()
            attention = torch.cat([ragged.attention, torch.ones(len(live), 1, dtype=torch.long, device=device)], 1)
            logits = self.family.logits(step_input, states, mask, cache, attention_mask=attention,
                                        position_ids=ragged.positions)[:, -1].float()
            self.stats.steps += 1
            self.stats.batch_sizes.append(len(live))
            keep, tokens = [], []
            for i, row in enumerate(live):
                sequence = torch.tensor([ragged.sequences[i]], device=device)
                scores = self.processors(sequence, logits[i : i + 1])
                token = int(scores.argmax(dim=-1))
                results[row].logprob_sum += float(scores.log_softmax(dim=-1)[0, token])
                ragged.sequences[i].append(token)
                ragged.budgets[i] -= 1
                if token in eos:
                    continue
                results[row].tokens.append(token)
                if ragged.budgets[i] <= 0:
                    results[row].finished = False
                    continue
                keep.append(i)
                tokens.append(token)
            ragged.attention, ragged.positions = attention, ragged.positions + 1
            if len(keep) < len(live):
                if not keep:
                    return
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                states = states.index_select(0, index)
                mask = mask.index_select(0, index) if mask is not None else None
                ragged.select(keep)
                live = [live[i] for i in keep]
            step_input = torch.tensor([[t] for t in tokens], device=device)


def _batched_scores(processors, sequence, prompt_length: int, logits) -> torch.Tensor | None:
    """The processed scores along a draft in one processors call, when the processors allow it: token
    suppression is the same at every position, and begin-suppression fires only right after the
    prompt (position 0, scored on its own). None: score position by position instead."""
    if not all(type(p) in (SuppressTokens, SuppressTokensAtBegin) for p in processors):
        return None
    if any(type(p) is SuppressTokensAtBegin and p.begin_index != prompt_length for p in processors):
        return None
    first = processors(sequence[:, :prompt_length], logits[:1])
    rest = logits[1:]
    if len(rest):  # any length other than the begin index: only plain suppression applies
        rest = processors(sequence[:, : prompt_length + 1].expand(len(rest), -1), rest)
    return torch.cat([first, rest])


LOST_GUESS = 4  # tokens a lost draft guesses after a copy of greedy's choice


def _resume_at(draft: list[int], position: int, choice: int, reach: int = 3, lost: bool = False) -> int | None:
    """Where the draft goes on after greedy chose ``choice`` instead of ``draft[position]``: after
    the nearest copy of ``choice`` within ``reach`` tokens (the draft had extra tokens before it, or
    lacked this one), else after ``position`` (one token misheard), or at ``position`` when that
    was the draft's last token: a partial ends early, so greedy is adding words and the partial's
    ending (most often its period) may still end the sentence.

    A ``lost`` draft (its last guesses confirmed nothing: the partial misheard a whole stretch) goes
    on only after the next copy of ``choice`` ahead of ``position`` with tokens after it, where the
    partial may agree again; None when there is none (no guess: a plain step)."""
    if lost:
        return next((j + 1 for j in range(position, len(draft) - 1) if draft[j] == choice), None)
    nearby = [j for j in range(max(position - reach, 0), min(position + reach + 1, len(draft))) if draft[j] == choice]
    if nearby:
        return min(nearby, key=lambda j: (abs(j - position), -j)) + 1
    return position + 1 if position + 1 < len(draft) else position


def _valid_prefix(draft: list[int], vocab: int) -> list[int]:
    """The draft up to its first id that is not a token of the model (a draft is only a guess)."""
    for i, token in enumerate(draft):
        if not 0 <= token < vocab:
            return draft[:i]
    return draft


@dataclass
class _Ragged:
    """Rows of unequal length decoding in one lockstep: per-row tokens, cache mask, positions, budgets."""

    sequences: list[list[int]]  # prompt + tokens so far, per row
    attention: torch.Tensor  # [rows, cache slots]: 1 where a row's cache slot is its own
    positions: torch.Tensor  # [rows, 1]: the position of each row's next input token
    budgets: list[int]  # tokens each row may still generate

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.attention.device)
        self.sequences = [self.sequences[i] for i in keep]
        self.attention = self.attention.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.budgets = [self.budgets[i] for i in keep]


def _select_cache(cache: EncoderDecoderCache, rows: torch.Tensor, length: int) -> EncoderDecoderCache:
    """A new cache holding ``rows`` of ``cache``, self-attention cut to its first ``length`` positions."""
    layers = []
    for own, cross in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        layers.append((own.keys[rows, :, :length], own.values[rows, :, :length], cross.keys[rows], cross.values[rows]))
    return EncoderDecoderCache(layers)


def run_rows(engine: Engine, audios: list[np.ndarray], rows: list[tuple[int, Target]], *, window: str = "exact",
             max_new_tokens: int | None = None, should_stop: Callable[[], bool] | None = None,
             drafts: list[list[int] | None] | Callable[[], list[list[int] | None]] | None = None,
             word_timings: bool | list[bool] = False) -> list[Hypothesis]:
    """Encode ``audios`` on ``window`` and decode ``rows``; a fast-window row that comes back broken
    (non-finite encoder output, or a repetition loop) is decoded again on the exact window. With
    ``word_timings`` (True, or one flag per row) the hypotheses get ``words`` (``engine/timing.py``)
    where the model has alignment heads. ``drafts`` may be a function: it is called after the
    encoder pass, so the drafts are the freshest there are when decoding starts."""
    encoded = engine.encode(audios, window)
    if callable(drafts):
        drafts = drafts()
    hypotheses = engine.decode(encoded, rows, max_new_tokens, should_stop, drafts)
    if encoded.window == "fast":
        hypotheses, exact, broken = _redo_broken(engine, audios, rows, encoded, hypotheses, max_new_tokens, should_stop)
    else:
        exact, broken = None, {}
    wanted = [word_timings] * len(rows) if isinstance(word_timings, bool) else list(word_timings)
    if any(wanted):
        _add_word_timings(engine, audios, rows, encoded, hypotheses, exact, broken, wanted)
    return hypotheses


def _add_word_timings(engine, audios, rows, encoded, hypotheses, exact, broken: dict[int, int], wanted) -> None:
    """Words for every hypothesis, from the encoder output that decoded it (fast, or the exact redo)."""
    from .timing import supports_word_timings, word_timings

    if not supports_word_timings(engine):
        return
    for i, hypothesis in enumerate(hypotheses):
        if not wanted[i]:
            continue
        source, utterance = (exact, broken[i]) if i in broken else (encoded, rows[i][0])
        states = source.states[utterance, : source.frames[utterance]]
        hypothesis.words = word_timings(engine, states, audios[rows[i][0]], hypothesis)


def _redo_broken(engine, audios, rows, encoded, hypotheses, max_new_tokens, should_stop):
    """Fast-window rows that came back broken, decoded again on the exact window. Returns the
    hypotheses, the exact EncodedBatch (or None) and {row: its utterance in that batch}."""
    finite = torch.isfinite(encoded.states).flatten(1).all(dim=1).tolist()
    broken = [i for i, h in enumerate(hypotheses) if h.looks_broken or not finite[rows[i][0]]]
    if not broken:
        return hypotheses, None, {}
    utterances = sorted({rows[i][0] for i in broken})
    renumber = {u: n for n, u in enumerate(utterances)}
    exact = engine.encode([audios[u] for u in utterances], "exact")
    redo = engine.decode(exact, [(renumber[rows[i][0]], rows[i][1]) for i in broken], max_new_tokens, should_stop)
    for i, hypothesis in zip(broken, redo):
        hypotheses[i] = hypothesis
    return hypotheses, exact, {i: renumber[rows[i][0]] for i in broken}
