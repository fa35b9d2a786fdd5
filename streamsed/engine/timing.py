"""Word timings for Whisper hypotheses: cross-attention of the alignment heads, aligned by DTW.

This is openai-whisper's ``find_alignment``, which transformers' ``return_token_timestamps`` also
follows: run the decoder once more over prompt + tokens + EOS with attention weights on; take the
cross-attention of the heads the checkpoint lists in ``generation_config.alignment_heads``, cut to
the frames that hold audio; normalize each head over the tokens, median-filter along time, average
the heads; dynamic time warping through the (tokens x frames) matrix gives each token the encoder
frame (20 ms) where it starts. Tokens are grouped into words as transformers' Whisper tokenizer
does for ``return_timestamps="word"`` (spaces, or Unicode characters for languages without them,
punctuation merged into the neighbouring word).

DTW has to give every frame to some token, so silence lands in the word next to it: the path
starts at frame 0 (the VAD's pre-roll) and a pause between sentences becomes part of the next word.
A word is therefore trimmed to its voiced frames (within 30 dB of the loudest frame), keeping the
longest voiced piece when a pause of 200 ms or more splits them.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter
from transformers.models.whisper.tokenization_whisper import LANGUAGES, _combine_tokens_into_words

__all__ = ["word_timings", "supports_word_timings"]

SECONDS_PER_FRAME = 0.02  # one encoder frame: two 10 ms log-mel frames


def supports_word_timings(engine) -> bool:
    family = getattr(engine, "family", None)
    return getattr(family, "name", None) == "whisper" and bool(getattr(family.generation_config, "alignment_heads", None))


@torch.inference_mode()
def word_timings(engine, states: torch.Tensor, audio: np.ndarray, hypothesis) -> list[dict]:
    """``[{"word", "start", "end"}]`` in seconds from the utterance start, for one hypothesis whose
    utterance is ``audio`` (16 kHz) with encoder output ``states`` [frames, hidden]. The words
    joined give its text."""
    tokens = list(hypothesis.tokens)
    if not tokens:
        return []
    family, model = engine.family, engine.model
    prompt = family.prompt(hypothesis.target)
    ids = torch.tensor([prompt + tokens + family.eos_token_ids[:1]], device=engine.device)
    audio_frames = max(1, min(states.shape[0], int(round(len(audio) / engine.sample_rate / SECONDS_PER_FRAME))))
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights exist only on the eager path
    try:
        out = model.model.decoder(input_ids=ids, encoder_hidden_states=states[None], output_attentions=True,
                                  use_cache=False)
    finally:
        model.set_attn_implementation(implementation)
    heads = family.generation_config.alignment_heads
    weights = torch.stack([out.cross_attentions[layer][0, head] for layer, head in heads]).float()
    weights = weights[:, :, :audio_frames]
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = _median_filter((weights - mean) / std, int(getattr(model.config, "median_filter_width", 7)))
    matrix = weights.mean(dim=0)[len(prompt) - 1 : -1]  # the rows that predict each token and EOS
    text_indices, time_indices = _dynamic_time_warping(-matrix.double().cpu().numpy())
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    times = time_indices[jumps] * SECONDS_PER_FRAME  # start of every token, and of EOS
    language = LANGUAGES.get(hypothesis.target.target_lang or "en", "english")
    words, _, indices = _combine_tokens_into_words(engine.tokenizer, tokens, language)
    voiced = _voiced_frames(audio, engine.sample_rate)
    timed = []
    for word, i in zip(words, indices):
        start, end = _snap_to_voice(int(round(times[i[0]] / SECONDS_PER_FRAME)),
                                    int(round(times[i[-1] + 1] / SECONDS_PER_FRAME)), voiced)
        timed.append({"word": word, "start": round(start * SECONDS_PER_FRAME, 3),
                      "end": round(end * SECONDS_PER_FRAME, 3)})
    timed[0]["word"] = timed[0]["word"].lstrip()  # joined, the words are the hypothesis' (stripped) text
    timed[-1]["word"] = timed[-1]["word"].rstrip()
    return [w for w in timed if w["word"]]


def _voiced_frames(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Per 20 ms frame: is its RMS within 30 dB of the loudest frame's."""
    size = int(sample_rate * SECONDS_PER_FRAME)
    count = max(1, len(audio) // size)
    frames = np.asarray(audio[: count * size], dtype=np.float64).reshape(count, -1)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    return rms > rms.max() * 10 ** (-30 / 20) if rms.max() > 0 else np.zeros(count, dtype=bool)


def _snap_to_voice(start: int, end: int, voiced: np.ndarray, pause: int = 10) -> tuple[int, int]:
    """Frames [start, end) of a word, trimmed to its voiced part. When silence of ``pause`` frames
    (200 ms) splits that part, the longest piece is the word: the others are the tail of the word
    before or the head of the next that DTW attached to it."""
    inside = np.flatnonzero(voiced[start:end])
    if not len(inside):
        return start, max(end, start)
    breaks = np.flatnonzero(np.diff(inside) > pause)
    pieces = np.split(inside, breaks + 1)
    longest = max(pieces, key=len)
    return start + int(longest[0]), start + int(longest[-1]) + 1
