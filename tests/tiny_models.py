"""Small random-init speech seq2seq models built from configs, the way the transformers docs do.

No weights are downloadable here, so parity tests run on these: the engine must reproduce
``model.generate`` token for token whatever the weights are.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    BertConfig,
    GenerationConfig,
    GPT2Config,
    HubertConfig,
    MBartConfig,
    PreTrainedTokenizerFast,
    SpeechEncoderDecoderConfig,
    SpeechEncoderDecoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", "en_XX", "de_DE", "fr_XX"]
VOCAB_SIZE = 96
PAD, UNK, CLS, SEP, EOS, EN, DE, FR = range(8)


def word_tokenizer(specials=SPECIALS, vocab_size=VOCAB_SIZE) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    backend = Tokenizer(WordLevel(vocab, unk_token=specials[1]))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=specials[0],
        unk_token=specials[1],
        additional_special_tokens=specials[2:],
    )


# Shared by the wav2vec2 and HuBERT encoders: 2 layers, a 3-layer conv front end (80x downsampling).
_CONV_ENCODER = dict(
    num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, conv_dim=(16, 16, 16),
    conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
)


def wav2vec2_config(hidden=32, **overrides) -> Wav2Vec2Config:
    return Wav2Vec2Config(hidden_size=hidden, **_CONV_ENCODER, **overrides)


def hubert_config(hidden=32) -> HubertConfig:
    return HubertConfig(hidden_size=hidden, **_CONV_ENCODER)


def bert_decoder_config(hidden=24) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=128, initializer_range=0.5,
    )


def gpt2_decoder_config() -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.5)


def mbart_decoder_config() -> MBartConfig:
    return MBartConfig(
        vocab_size=VOCAB_SIZE, d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=48,
        encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=48, max_position_embeddings=128,
        pad_token_id=PAD, bos_token_id=CLS, eos_token_id=EOS, decoder_start_token_id=EOS, init_std=0.5,
    )


def speech_encoder_decoder(encoder_config, decoder_config, seed=0, start=CLS) -> SpeechEncoderDecoderModel:
    torch.manual_seed(seed)
    config = SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config, decoder_config)
    config.decoder_start_token_id = start
    config.pad_token_id = PAD
    model = SpeechEncoderDecoderModel(config=config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=start, pad_token_id=PAD, eos_token_id=None)
    return model


def wav2vec2_feature_extractor(attention_mask=True) -> Wav2Vec2FeatureExtractor:
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                    do_normalize=True, return_attention_mask=attention_mask)


WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>",
                    "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
WHISPER_EOS = 100  # like real Whisper: text tokens, then specials, then timestamp tokens


def tiny_whisper(seed=0, prev_token=False):
    """A 2-layer random Whisper with a real-looking generation config (languages, tasks, suppression).

    ``prev_token``: the last text token becomes ``<|startofprev|>`` (suppressed, as in real Whisper),
    so the model takes prompts."""
    torch.manual_seed(seed)
    vocab = 128
    sot, timestamp_begin = WHISPER_EOS + 1, WHISPER_EOS + len(WHISPER_SPECIALS)
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
        max_source_positions=1500, max_target_positions=64, init_std=0.5,
        decoder_start_token_id=sot, eos_token_id=WHISPER_EOS, pad_token_id=WHISPER_EOS, bos_token_id=WHISPER_EOS,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=WHISPER_EOS, pad_token_id=WHISPER_EOS,
        no_timestamps_token_id=timestamp_begin - 1, is_multilingual=True, max_length=64,
        lang_to_id={"<|en|>": 102, "<|de|>": 103, "<|fr|>": 104}, task_to_id={"translate": 105, "transcribe": 106},
        # A random model would emit timestamp tokens, which make generate() seek; real ones do not.
        suppress_tokens=[10, 11, 12, *range(timestamp_begin, vocab)],
        begin_suppress_tokens=[13, WHISPER_EOS],
    )
    words = [f"w{i}" for i in range(WHISPER_EOS)]
    if prev_token:
        words[-1] = "<|startofprev|>"
        model.generation_config.suppress_tokens.append(WHISPER_EOS - 1)
        model.generation_config.prev_sot_token_id = WHISPER_EOS - 1
    timestamps = [f"<|t{i}|>" for i in range(vocab - timestamp_begin)]
    vocabulary = {tok: i for i, tok in enumerate(words + WHISPER_SPECIALS + timestamps)}
    backend = Tokenizer(WordLevel(vocabulary, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="w0", eos_token="<|endoftext|>",
        additional_special_tokens=WHISPER_SPECIALS[1:] + timestamps + (["<|startofprev|>"] if prev_token else []),
    )
    return model, WhisperFeatureExtractor(feature_size=80), tokenizer


def noise_audio(seconds: float, seed: int) -> np.ndarray:
    """Deterministic audio-like input: a few tones plus noise, float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    tones = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(120, 900, 3))
    return (0.1 * tones + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def tiny_speech2text(seed=0):
    """A random fairseq-S2T model with a multilingual-style forced target-language token."""
    from transformers import Speech2TextConfig, Speech2TextFeatureExtractor, Speech2TextForConditionalGeneration

    torch.manual_seed(seed)
    config = Speech2TextConfig(
        vocab_size=VOCAB_SIZE, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, input_feat_per_channel=80,
        conv_channels=32, max_source_positions=1500, max_target_positions=128, init_std=0.5,
        pad_token_id=PAD, bos_token_id=CLS, eos_token_id=EOS, decoder_start_token_id=EOS,
    )
    model = Speech2TextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=EOS, pad_token_id=PAD, eos_token_id=None)
    extractor = Speech2TextFeatureExtractor(feature_size=80, num_mel_bins=80, return_attention_mask=True)
    return model, extractor, word_tokenizer()


# A random tiny model's text is a loop of a few word ids, which the hallucination guard rightly drops
# as "repetition". Tests of streaming mechanics on these models switch the guard off; the guard
# itself is tested on whisper-base (test_fidelity.py) and without a model (test_guard.py).
NO_GUARD = {"enabled": False}
NO_GUARD_ENV = {"STREAMSED_GUARD__ENABLED": "false"}
