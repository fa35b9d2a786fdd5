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
    assert_draft_parity(engine, audios, target, expected)
    return expected


def draft_variants(expected: list[int], vocab: int, eos: int, seed: int) -> dict[str, list[int]]:
    """Drafts a session could offer for a row whose greedy output is ``expected``."""
    rng = torch.Generator().manual_seed(seed)
    garbage = torch.randint(0, vocab, (MAX_NEW + 8,), generator=rng).tolist()
    half = len(expected) // 2
    wrong = (expected[half] + 1) % vocab if expected else 3
    return {
        "correct": list(expected),
        "partly wrong": expected[:half] + [wrong] + expected[half + 1:],  # one token misheard
        "a token missing": expected[:half] + expected[half + 1:],
        "a token extra": expected[:half] + [wrong] + expected[half:],
        "garbage": garbage[:10],
        "empty": [],
        "over-long": expected + garbage,  # longer than the length limit
        "eos inside": expected[:2] + [eos] + expected[2:],
        "prefix": expected[: max(len(expected) - 3, 0)],  # what an earlier, shorter partial says
        "ends early": expected[:half] + expected[-1:],  # a partial's last words missing, its ending kept
        "a stretch misheard": [(t + 1) % vocab for t in expected[:half]] + expected[half:],  # then right again
    }


def assert_draft_parity(engine, audios, target, expected):
    """Tokens are generate()'s with any draft; a correct one is verified in a single forward."""
    vocab = engine.family.logits.__self__.model.config.get_text_config().vocab_size
    eos = engine.family.eos_token_ids[0]
    encoded = engine.encode(audios)
    rows = [(u, target) for u in range(len(audios))]
    per_row = [draft_variants(e, vocab, eos, seed) for seed, e in enumerate(expected)]
    for name in per_row[0]:
        hyps = engine.decode(encoded, rows, MAX_NEW, drafts=[v[name] for v in per_row])
        assert [h.tokens for h in hyps] == expected, name
        stats = engine.last_stats
        budget = engine._length_budget(engine.family.prompt(hyps[0].target), MAX_NEW)[1]
        assert stats.draft_offered == sum(min(len(v[name]), budget) for v in per_row), name
        if name == "correct":
            assert stats.steps == 1 and all(h.draft_accepted == len(e) for h, e in zip(hyps, expected))
        if name == "prefix":
            assert all(h.draft_accepted == len(v["prefix"]) for h, v in zip(hyps, per_row))
            # One verify forward, then three steps: in one ragged lockstep where the family supports
            # it (Whisper), else per group of rows that accepted equally many tokens.
            groups = 1 if engine.family.positions_and_mask else len(rows)
            assert stats.steps <= 1 + 3 * groups
    # A row decoding alone realigns the rest of a draft after a wrong token: still the same tokens
    # (alone = generate() of that input alone, which assert_parity checked; padding can change it).
    for u, audio in enumerate(audios):
        alone = engine.encode([audio])
        (plain,) = engine.decode(alone, [(0, target)], MAX_NEW)
        for name, draft in draft_variants(plain.tokens, vocab, eos, u).items():
            (hyp,) = engine.decode(alone, [(0, target)], MAX_NEW, drafts=[draft])
            assert hyp.tokens == plain.tokens, (u, name)
            assert hyp.draft_accepted <= hyp.draft_offered, (u, name)  # a resumed guess counts tokens once
    # Rows of one batch may each bring another kind of draft.
    names = list(per_row[0])
    mixed = [v[names[i % len(names)]] for i, v in enumerate(per_row)]
    assert [h.tokens for h in engine.decode(encoded, rows, MAX_NEW, drafts=mixed)] == expected


def test_a_rejected_draft_resumes_where_its_tokens_line_up_again():
    from streamsed.engine.engine import _resume_at

    draft = [10, 11, 12, 13, 14]
    assert _resume_at(draft, 2, 99) == 3  # one token misheard: go on after it
    assert _resume_at(draft, 2, 13) == 4  # the draft had an extra token: go on after greedy's choice
    assert _resume_at(draft, 2, 11) == 2  # the draft lacked a token: its rest comes one later
    assert _resume_at(draft, 4, 99) == 4  # greedy adds words before the last token: guess it again
    # Lost (the last guesses confirmed nothing): only a copy of greedy's choice further on re-syncs.
    assert _resume_at(draft, 1, 13, lost=True) == 4
    assert _resume_at(draft, 1, 10, lost=True) is None  # behind: the draft has already gone past it
    assert _resume_at(draft, 1, 99, lost=True) is None
    assert _resume_at(draft, 1, 14, lost=True) is None  # its last token: nothing after it to guess


def test_the_vocabulary_projection_equals_the_linear_layer():
    from streamsed.engine.projection import few_rows, project

    linear = torch.nn.Linear(64, 3000)
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            for batch, positions in [(1, 1), (1, 2), (2, 3), (3, 3), (1, few_rows()), (1, few_rows() + 4)]:
                hidden = torch.randn(batch, positions, 64)
                with torch.inference_mode():
                    got, want = project(linear, hidden), linear(hidden)
                assert got.shape == want.shape == (batch, positions, 3000)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        finally:
            torch.set_num_threads(before)
    unbiased = torch.nn.Linear(64, 300, bias=False)
    for positions in (1, 4):
        hidden = torch.randn(1, positions, 64)
        torch.testing.assert_close(project(unbiased, hidden), unbiased(hidden), rtol=1e-5, atol=1e-5)


def test_the_projection_keeps_one_transposed_copy_per_weight_and_follows_changes():
    from streamsed.engine import projection

    linear = torch.nn.Linear(64, 500)
    hidden = torch.randn(1, 1, 64)
    with torch.inference_mode():
        projection.project(linear, hidden)
    first = projection._transposed(linear.weight)
    assert projection._transposed(linear.weight) is first  # made once, shared (lanes share weights)
    with torch.no_grad():  # what an optimizer step does to the weight
        linear.weight.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(projection.project(linear, hidden), linear(hidden), rtol=1e-5, atol=1e-5)
    assert projection._transposed(linear.weight) is not first
    key = id(linear.weight)
    del linear
    assert key not in projection._copies  # dropped with its weight


def test_suppression_processors_score_like_generate_s():
    from transformers.generation.logits_process import (
        SuppressTokensAtBeginLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    from streamsed.engine.suppression import SuppressTokens, SuppressTokensAtBegin

    ours = [SuppressTokens([1, 5, 7]), SuppressTokensAtBegin([2, 5], begin_index=4)]
    theirs = [SuppressTokensLogitsProcessor([1, 5, 7]), SuppressTokensAtBeginLogitsProcessor([2, 5], begin_index=4)]
    for vocab in (10, 12):  # a mask per vocabulary size
        for length in (3, 4, 5):  # begin-suppression only right after the prompt
            scores, ids = torch.randn(2, vocab), torch.zeros(2, length, dtype=torch.long)
            for mine, reference in zip(ours, theirs):
                assert torch.equal(mine(ids, scores), reference(ids, scores)), (type(mine), vocab, length)
    assert torch.isinf(ours[1](torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 10))[0, [2, 5]]).all()


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


def test_tiny_whisper_with_a_prompt_matches_generate_with_prompt_ids():
    """A prompt (previous-text context after <|startofprev|>) changes the output; the engine's
    tokens still equal generate(prompt_ids=...) for the same ids, batched, single and with drafts."""
    model, fe, tokenizer = tm.tiny_whisper(prev_token=True)
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    audios = [tm.noise_audio(s, 40 + seed) for seed, s in enumerate([1.0, 2.5, 0.4])]
    target = Target("de", "de", "w5 w6  w7")
    ids = engine.family.context_tokens(target.prompt)
    assert ids == [tm.WHISPER_EOS - 1, 5, 6, 7]  # <|startofprev|> + the prompt's own tokens
    assert engine.family.prompt(target) == ids + engine.family.prompt(Target("de", "de"))
    plain = [h[0].tokens for h in engine.transcribe(audios, [Target("de", "de")], max_new_tokens=MAX_NEW)]
    expected = assert_parity(model, engine, audios, target, 0, language="de", task="transcribe",
                             prompt_ids=torch.tensor(ids))
    assert expected != [tokens[: len(e)] for tokens, e in zip(plain, expected)], "the prompt changed nothing"
    # A context longer than the model allows keeps its last max_target_positions // 2 - 1 tokens.
    long_prompt = " ".join(f"w{i % 90 + 3}" for i in range(50))
    kept = engine.family.context_tokens(long_prompt)
    assert len(kept) == 1 + 64 // 2 - 1 and kept[-1] == (49 % 90 + 3)


def test_prompts_are_refused_by_models_without_previous_text_context():
    model, fe, tokenizer = tm.tiny_whisper()  # no <|startofprev|> in its vocabulary
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    with pytest.raises(UnsupportedTarget, match="startofprev"):
        engine.check_target(Target("de", "de", "hello"))
    seed = tm.speech_encoder_decoder(tm.wav2vec2_config(), tm.bert_decoder_config())
    seed_engine = engine_from_model(seed, tm.wav2vec2_feature_extractor(), tm.word_tokenizer(), device="cpu")
    with pytest.raises(UnsupportedTarget, match="prompt"):
        seed_engine.check_target(Target(None, None, "hello"))


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


def test_whisper_fast_window_is_the_stock_encoder_on_a_shorter_window():
    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    features = engine.feature_inputs([tm.noise_audio(1.0, 90)])["input_features"]
    with torch.inference_mode():
        stock = model.get_encoder()(features).last_hidden_state
        full = engine.family.encode_window(features)
        torch.testing.assert_close(full, stock, rtol=0, atol=1e-5)
        assert engine.window_frames(16000) == 600  # 1 s + 5 s margin, whole seconds, 100 frames/s
        assert engine.window_frames(16000 * 29) == 3000  # capped at the 30 s window
        short = engine.encode([tm.noise_audio(1.0, 90)], "fast")
    assert short.window == "fast" and short.frames == [300] and short.states.shape[1] == 300


def test_fast_window_output_does_not_depend_on_the_batch():
    """Offline == streaming: an utterance decodes the same alone or batched with longer ones."""
    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    audios = [tm.noise_audio(s, 91 + i) for i, s in enumerate([0.5, 3.2, 7.5, 0.9])]
    batched = engine.transcribe(audios, [Target("de", "de")], MAX_NEW, window="fast")
    assert {h[0].window for h in batched} == {"fast"}
    for audio, hyps in zip(audios, batched):
        assert engine.transcribe([audio], [Target("de", "de")], MAX_NEW, window="fast")[0][0].tokens == hyps[0].tokens
    assert len(engine.encode(audios, "fast").frames) == 4 and len(set(engine.encode(audios, "fast").frames)) == 3
    # A draft changes nothing on the fast window either.
    encoded = engine.encode(audios, "fast")
    rows = [(u, Target("de", "de")) for u in range(len(audios))]
    drafted = engine.decode(encoded, rows, MAX_NEW, drafts=[h[0].tokens[:-1] for h in batched])
    assert [h.tokens for h in drafted] == [h[0].tokens for h in batched]


def test_window_settings_resolve_per_model_and_device():
    model, fe, tokenizer = tm.tiny_whisper()
    whisper = engine_from_model(model, fe, tokenizer, device="cpu")
    assert [whisper.resolve_window(w) for w in ("exact", "fast", "auto")] == ["exact", "fast", "fast"]
    whisper.device = torch.device("cuda")  # only the policy is asked: nothing runs on it
    assert whisper.resolve_window("auto") == "exact"
    w2v = tm.speech_encoder_decoder(tm.wav2vec2_config(), tm.bert_decoder_config())
    unpadded = engine_from_model(w2v, tm.wav2vec2_feature_extractor(), tm.word_tokenizer(), device="cpu")
    assert unpadded.resolve_window("fast") == "exact"  # nothing is padded: fast = exact
    audio = [tm.noise_audio(0.8, 95)]
    assert unpadded.transcribe(audio, [Target()], MAX_NEW, window="fast")[0][0].tokens == \
        unpadded.transcribe(audio, [Target()], MAX_NEW)[0][0].tokens
    with pytest.raises(ValueError, match="window must be one of"):
        whisper.resolve_window("quick")


def test_a_broken_fast_window_result_falls_back_to_the_exact_window(monkeypatch):
    from streamsed.engine import engine as engine_module

    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    audios = [tm.noise_audio(1.0, 96), tm.noise_audio(2.0, 97)]
    exact = [h[0].tokens for h in engine.transcribe(audios, [Target("de", "de")], MAX_NEW, window="exact")]
    # Non-finite encoder output on the fast window: that utterance is redone on the exact one.
    real = engine.family.encode_window
    monkeypatch.setattr(engine.family, "encode_window", lambda f: real(f) * float("nan") if f.shape[0] == 1 and
                        f.shape[-1] == 600 else real(f))
    hyps = engine.transcribe(audios, [Target("de", "de")], MAX_NEW, window="fast")
    assert hyps[0][0].window == "exact" and hyps[0][0].tokens == exact[0]
    assert hyps[1][0].window == "fast"
    monkeypatch.setattr(engine.family, "encode_window", real)
    # A repetition loop (here: every text, with the threshold at zero) is redone too.
    monkeypatch.setattr(engine_module, "LOOP_COMPRESSION_RATIO", -1.0)
    hyps = engine.transcribe(audios, [Target("de", "de")], MAX_NEW, window="fast")
    assert [h[0].window for h in hyps] == ["exact", "exact"] and [h[0].tokens for h in hyps] == exact


def test_int8_quantizes_the_linear_layers_on_cpu_only():
    import unittest.mock

    from streamsed.engine.loading import ModelUnavailable, resolve_device

    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu", dtype="int8")
    assert engine.quantized == "int8" and engine.dtype == torch.float32
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

    modules = list(engine.model.modules())
    assert any(isinstance(m, QuantizedLinear) for m in modules)
    assert not any(type(m) is torch.nn.Linear for m in modules)  # every float Linear was replaced
    (hyp,) = engine.transcribe([tm.noise_audio(1.0, 98)], [Target("de", "de")], MAX_NEW)[0]
    assert hyp.tokens  # it decodes (its output may differ from float32: quantization is lossy)
    with unittest.mock.patch("torch.cuda.is_available", return_value=True):  # as if a GPU were there
        with pytest.raises(ModelUnavailable, match="CPU only"):
            resolve_device("cuda", "int8")


def test_whisper_length_limit_from_the_generation_config_like_generate():
    """Whisper's generate() does not count the prompt in a config max_length (unlike other models)."""
    model, fe, tokenizer = tm.tiny_whisper()
    model.generation_config.max_length = 10
    model.generation_config.max_new_tokens = None
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    audios = [tm.noise_audio(1.0, 99), tm.noise_audio(1.7, 100)]
    inputs = engine.feature_inputs(audios)
    with torch.inference_mode():
        out = model.generate(inputs["input_features"], language="de", task="transcribe", num_beams=1, do_sample=False)
    eos = model.generation_config.eos_token_id
    expected = [[t for t in row if t != eos] for row in out.tolist()]
    got = [h[0].tokens for h in engine.transcribe(audios, [Target("de", "de")])]
    assert got == expected and max(len(t) for t in got) == 10
    drafted = engine.decode(engine.encode(audios), [(0, Target("de", "de")), (1, Target("de", "de"))],
                            drafts=[expected[0] + [5, 6, 7], [-1, 10**9]])  # over-long; ids no model has
    assert [h.tokens for h in drafted] == expected
