"""The engine's cached greedy decode must equal ``model.generate(num_beams=1, do_sample=False)``.

Random tiny models rarely emit EOS by chance, so each test first rolls the model out without EOS
and then declares as EOS a token the rows reach at *different* steps: rows then finish at different
times and the engine's pruning of finished rows is exercised, not just the happy path.
"""

from collections import Counter

import pytest
import torch

from streamsed.engine.engine import Target, UnsupportedTarget
from streamsed.engine.loading import engine_from_model, load_engine
from tests import tiny_models as tm

MAX_NEW = 24


def generated_part(sequences: torch.Tensor, prompt_length: int, eos_ids) -> list[list[int]]:
    rows = []
    for row in sequences.tolist():
        tokens = row[prompt_length:]
        for i, token in enumerate(tokens):
            if token in eos_ids:
                tokens = tokens[:i]
                break
        rows.append(tokens)
    return rows


def reference(model, engine, audios, prompt_length, **generate_kwargs):
    inputs = engine.feature_inputs(audios)
    main = inputs.pop(engine.feature_extractor.model_input_names[0])
    with torch.inference_mode():
        out = model.generate(main, **inputs, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW, **generate_kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    # Finished rows of a batch are padded with pad_token_id after their EOS.
    return generated_part(sequences, prompt_length, [*eos, model.generation_config.pad_token_id])


def pick_staggered_eos(rollouts: list[list[int]], avoid: set[int]) -> int:
    """A token whose first occurrence differs across rows (so rows stop at different steps)."""
    firsts: dict[int, set[int]] = {}
    for row in rollouts:
        for pos, token in enumerate(row):
            if token not in avoid and pos > 0:
                firsts.setdefault(token, set())
        for token in firsts:
            if token in row:
                firsts[token].add(row.index(token))
    counts = Counter(t for row in rollouts for t in set(row))
    ranked = sorted(firsts, key=lambda t: (-len(firsts[t]), -counts[t]))
    assert ranked, "rollout produced no usable token"
    return ranked[0]


def assert_parity(model, engine, audios, target, prompt_length, **generate_kwargs):
    """Roll out, choose a staggered EOS, then compare engine vs generate for single and batched input."""
    rollout = reference(model, engine, audios, prompt_length, **generate_kwargs)
    eos = pick_staggered_eos(rollout, avoid=set(engine.family.suppressed_tokens()[0]))
    model.generation_config.eos_token_id = eos
    engine.family.eos_token_ids = [eos]

    expected = reference(model, engine, audios, prompt_length, **generate_kwargs)
    batched = engine.transcribe(audios, [target], max_new_tokens=MAX_NEW)
    assert [h[0].tokens for h in batched] == expected
    assert max(engine.last_stats.batch_sizes) == len(audios)
    # Single inputs too (with padding in a batch, some encoders legitimately give other outputs).
    for audio in audios:
        (single,) = engine.transcribe([audio], [target], max_new_tokens=MAX_NEW)
        assert single[0].tokens == reference(model, engine, [audio], prompt_length, **generate_kwargs)[0]
    assert any(len(t) < MAX_NEW for t in expected), "EOS never reached: pruning untested"
    return expected


def test_wav2vec2_bert_matches_generate():
    model = tm.speech_encoder_decoder(tm.wav2vec2_config(), tm.bert_decoder_config())
    engine = engine_from_model(model, tm.wav2vec2_feature_extractor(), tm.word_tokenizer(), device="cpu")
    audios = [tm.noise_audio(s, seed) for seed, s in enumerate([1.0, 0.6, 1.4, 0.9])]
    expected = assert_parity(model, engine, audios, Target(), prompt_length=1)
    assert len({len(t) for t in expected}) > 1, "rows should finish at different steps"


def test_wav2vec2_gpt2_matches_generate():
    model = tm.speech_encoder_decoder(tm.wav2vec2_config(), tm.gpt2_decoder_config(), seed=1, start=tm.CLS)
    engine = engine_from_model(model, tm.wav2vec2_feature_extractor(), tm.word_tokenizer(), device="cpu")
    audios = [tm.noise_audio(s, 10 + seed) for seed, s in enumerate([0.8, 1.2, 0.5])]
    assert_parity(model, engine, audios, Target(), prompt_length=1)


def test_hubert_mbart_forced_language_token_matches_generate():
    model = tm.speech_encoder_decoder(tm.hubert_config(), tm.mbart_decoder_config(), seed=2, start=tm.EOS)
    engine = engine_from_model(model, tm.wav2vec2_feature_extractor(), tm.word_tokenizer(), device="cpu")
    audios = [tm.noise_audio(s, 20 + seed) for seed, s in enumerate([0.7, 1.1, 1.3])]
    assert engine.languages == ["de", "en", "fr"]
    de = assert_parity(model, engine, audios, Target(None, "de"), prompt_length=2, forced_bos_token_id=tm.DE)
    # The forced token steers the decoder: another target language gives another output.
    french = engine.transcribe(audios, [Target(None, "fr")], max_new_tokens=MAX_NEW)
    with torch.inference_mode():
        expected_fr = reference(model, engine, audios, 2, forced_bos_token_id=tm.FR)
    assert [h[0].tokens for h in french] == expected_fr
    assert expected_fr != de
    with pytest.raises(UnsupportedTarget, match="'ja'"):
        engine.transcribe(audios, [Target(None, "ja")])


def test_tiny_whisper_matches_generate_for_transcribe_and_translate():
    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    audios = [tm.noise_audio(s, 30 + seed) for seed, s in enumerate([1.0, 2.5, 0.4])]
    assert engine.family.prompt(Target("de", "de")) == [101, 103, 106, 107]
    assert engine.family.prompt(Target("de", "en")) == [101, 103, 105, 107]
    # Whisper's generate() returns only the generated part: nothing to strip.
    assert_parity(model, engine, audios, Target("de", "de"), 0, language="de", task="transcribe")
    translated = engine.transcribe(audios, [Target("de", "en")], max_new_tokens=MAX_NEW)
    assert [h[0].tokens for h in translated] == reference(model, engine, audios, 0, language="de", task="translate")


def test_whisper_rejects_unsupported_pairs_clearly():
    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    with pytest.raises(UnsupportedTarget, match="into English"):
        engine.check_target(Target("de", "fr"))
    with pytest.raises(UnsupportedTarget, match="'xx'"):
        engine.check_target(Target("xx", "xx"))


def test_multi_target_rows_share_one_encoder_pass():
    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    audios = [tm.noise_audio(1.0, 40), tm.noise_audio(1.5, 41)]
    encoded = engine.encode(audios)
    rows = [(0, Target("de", "de")), (0, Target("de", "en")), (1, Target("de", "de")), (1, Target("de", "en"))]
    hyps = engine.decode(encoded, rows, max_new_tokens=MAX_NEW)
    assert engine.last_stats.batch_sizes[0] == 4
    for (utterance, target), hyp in zip(rows, hyps):
        (single,) = engine.transcribe([audios[utterance]], [target], max_new_tokens=MAX_NEW)
        assert hyp.tokens == single[0].tokens


def test_seed_api_pretrained_parts_on_local_dirs_then_served(tmp_path):
    """SpeechEncoderDecoderModel.from_encoder_decoder_pretrained on local dirs, saved, loaded by path."""
    from transformers import BertLMHeadModel, SpeechEncoderDecoderModel, Wav2Vec2Model

    torch.manual_seed(3)
    Wav2Vec2Model(tm.wav2vec2_config()).save_pretrained(tmp_path / "encoder")
    BertLMHeadModel(tm.bert_decoder_config()).save_pretrained(tmp_path / "decoder")
    model = SpeechEncoderDecoderModel.from_encoder_decoder_pretrained(tmp_path / "encoder", tmp_path / "decoder")
    model.config.decoder_start_token_id = tm.CLS
    model.config.pad_token_id = tm.PAD
    model.generation_config.decoder_start_token_id = tm.CLS
    model.generation_config.pad_token_id = tm.PAD
    model.generation_config.eos_token_id = None

    checkpoint = tmp_path / "fine-tuned"
    model.save_pretrained(checkpoint)
    tm.wav2vec2_feature_extractor().save_pretrained(checkpoint)
    tm.word_tokenizer().save_pretrained(checkpoint)

    engine = load_engine(str(checkpoint), device="cpu")
    assert engine.family.name == "speech_encoder_decoder"
    audios = [tm.noise_audio(1.0, 50), tm.noise_audio(0.7, 51)]
    loaded = SpeechEncoderDecoderModel.from_pretrained(checkpoint).eval()
    expected = reference(loaded, engine, audios, 1)
    assert [h[0].tokens for h in engine.transcribe(audios, [Target()], max_new_tokens=MAX_NEW)] == expected
    in_memory = engine_from_model(model, tm.wav2vec2_feature_extractor(), tm.word_tokenizer(), device="cpu")
    assert [h[0].tokens for h in in_memory.transcribe(audios, [Target()], max_new_tokens=MAX_NEW)] == expected


def test_speech2text_matches_generate():
    model, extractor, tokenizer = tm.tiny_speech2text(seed=4)
    engine = engine_from_model(model, extractor, tokenizer, device="cpu")
    assert engine.family.name == "speech_to_text"
    audios = [tm.noise_audio(s, 60 + seed) for seed, s in enumerate([1.0, 0.6, 1.3])]
    assert_parity(model, engine, audios, Target(None, "de"), prompt_length=2, forced_bos_token_id=tm.DE)


def test_tiny_whisper_detects_the_language_like_generate():
    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    audios = [tm.noise_audio(s, 70 + seed) for seed, s in enumerate([1.0, 2.0, 0.5, 1.5])]
    inputs = engine.feature_inputs(audios)
    with torch.inference_mode():
        expected_ids = model.detect_language(inputs["input_features"]).tolist()
    id_to_code = {token_id: code for code, token_id in engine.family.languages.items()}
    hyps = [h[0] for h in engine.transcribe(audios, [Target()], max_new_tokens=MAX_NEW)]
    assert [h.target.source_lang for h in hyps] == [id_to_code[i] for i in expected_ids]
    assert all(h.target.target_lang == h.target.source_lang for h in hyps)  # transcribe
    expected = reference(model, engine, audios, 0, task="transcribe")
    assert [h.tokens for h in hyps] == expected
    with pytest.raises(UnsupportedTarget, match="give the source language"):
        engine.check_target(Target(None, "de"))
    engine.check_target(Target(None, "en"))  # translate into English works without a source


def test_length_limit_comes_from_the_generation_config_like_generate():
    """Without max_new_tokens, generate() stops where the generation config says (20 new tokens by default)."""
    model = tm.speech_encoder_decoder(tm.wav2vec2_config(), tm.bert_decoder_config(), seed=5)
    engine = engine_from_model(model, tm.wav2vec2_feature_extractor(), tm.word_tokenizer(), device="cpu")
    audios = [tm.noise_audio(1.0, 80), tm.noise_audio(0.7, 81)]
    inputs = engine.feature_inputs(audios)
    main = inputs.pop("input_values")
    with torch.inference_mode():
        sequences = model.generate(main, **inputs, num_beams=1, do_sample=False)
    expected = generated_part(sequences, 1, [tm.PAD])
    assert [h[0].tokens for h in engine.transcribe(audios, [Target()])] == expected
    assert max(len(t) for t in expected) == 20
    model.generation_config.max_length = 9  # counts the start token
    assert [len(h[0].tokens) for h in engine.transcribe(audios, [Target()])] == [8, 8]
