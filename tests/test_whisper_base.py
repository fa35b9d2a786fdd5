"""The real default model (Whisper base, converted from the PyPI CTranslate2 packages).

The engine must give generate()'s tokens on real speech in several languages, single and batched.
"""

import pytest
import torch

from streamsed.engine.engine import Engine, Target
from streamsed.engine.loading import load_engine
from tests.speech import espeak, words

pytestmark = pytest.mark.slow

# (text, espeak-ng voice). Whisper base understands these espeak-ng renderings well enough to
# check words; the parity tests would hold for any audio.
PHRASES = {
    "en": ("Hello everyone. Thank you for coming to the meeting today.", "en"),
    "de": ("Ich habe heute keine Zeit.", "de"),
    "fr": ("Je voudrais un café, s'il vous plaît.", "fr"),
    "es": ("Hoy hace buen tiempo.", "es"),
}


@pytest.fixture(scope="module")
def engine():
    return load_engine("whisper-base", device="cpu")


@pytest.fixture(scope="module")
def clips():
    return {lang: espeak(text, voice, 130) for lang, (text, voice) in PHRASES.items()}


def generate_tokens(engine, audios, language, task):
    inputs = engine.feature_inputs(audios)
    with torch.inference_mode():
        out = engine.model.generate(
            inputs["input_features"], language=language, task=task, num_beams=1, do_sample=False
        )
    eos = engine.family.eos_token_ids
    return [[t for t in row if t not in eos] for row in out.tolist()]


@pytest.mark.parametrize("lang", sorted(PHRASES))
def test_transcribe_matches_generate_single(engine, clips, lang):
    (hyp,) = engine.transcribe([clips[lang]], [Target(lang, lang)])[0]
    assert hyp.tokens == generate_tokens(engine, [clips[lang]], lang, "transcribe")[0]
    assert hyp.tokens, "real speech must give text"


def test_batched_transcribe_and_translate_match_generate(engine, clips):
    langs = sorted(PHRASES)
    audios = [clips[lang] for lang in langs]
    encoded = engine.encode(audios)
    rows = [(i, Target(lang, lang)) for i, lang in enumerate(langs)]
    rows += [(i, Target(lang, "en")) for i, lang in enumerate(langs) if lang != "en"]
    hyps = engine.decode(encoded, rows)
    assert engine.last_stats.batch_sizes[0] == len(rows)
    for (i, target), hyp in zip(rows, hyps):
        task = "transcribe" if target.target_lang == target.source_lang else "translate"
        assert hyp.tokens == generate_tokens(engine, [audios[i]], target.source_lang, task)[0], (target, hyp.text)


@pytest.mark.parametrize("lang", ["en", "de"])
def test_transcribed_words_are_right(engine, clips, lang):
    (hyp,) = engine.transcribe([clips[lang]], [Target(lang, lang)])[0]
    assert words(hyp.text) == words(PHRASES[lang][0])


def test_german_translated_into_english(engine):
    (hyp,) = engine.transcribe([espeak("Guten Morgen. Wie geht es dir?", "de", 130)], [Target("de", "en")])[0]
    assert words(hyp.text)[:2] == ["good", "morning"], hyp.text


def test_language_detection_matches_generate(engine, clips):
    langs = sorted(PHRASES)
    audios = [clips[lang] for lang in langs]
    hyps = [h[0] for h in engine.transcribe(audios, [Target()])]
    assert [h.target.source_lang for h in hyps] == langs
    assert [h.tokens for h in hyps] == generate_tokens(engine, audios, None, "transcribe")


def test_drafts_of_every_kind_give_generate_tokens(engine, clips):
    """Correct, partly wrong, garbage, empty, over-long and partial-style drafts, batched."""
    from tests.test_engine_parity import draft_variants

    langs = sorted(PHRASES)
    audios = [clips[lang] for lang in langs]
    expected = [generate_tokens(engine, [a], lang, "transcribe")[0] for a, lang in zip(audios, langs)]
    encoded = engine.encode(audios)
    rows = [(i, Target(lang, lang)) for i, lang in enumerate(langs)]
    eos = engine.family.eos_token_ids[0]
    variants = [draft_variants(e, engine.model.config.vocab_size, eos, seed) for seed, e in enumerate(expected)]
    for name in variants[0]:
        hyps = engine.decode(encoded, rows, drafts=[v[name] for v in variants])
        assert [h.tokens for h in hyps] == expected, name
        if name == "correct":  # verified in one forward instead of one per token
            assert engine.last_stats.steps == 1
    # Alone (as CPU lanes decode finals), a row realigns the rest of its draft after a wrong, missing
    # or extra token: two or three forwards instead of one per token after the error.
    realigned = 0
    for u, (audio, row) in enumerate(zip(audios, rows)):
        alone = engine.encode([audio])
        for name, draft in variants[u].items():
            (hyp,) = engine.decode(alone, [(0, row[1])], drafts=[draft])
            assert hyp.tokens == expected[u], (row, name)
            after_error = len(expected[u]) - len(expected[u]) // 2
            if name in ("partly wrong", "a token missing", "a token extra") and after_error > 3:
                # A missing token is first taken for a misheard one: one more forward finds the way back.
                assert engine.last_stats.steps == (3 if name == "a token missing" else 2), (row, name)
                realigned += 1
            half = len(expected[u]) // 2
            if name == "a stretch misheard" and half >= 3 and after_error > 3:
                # Two guesses fail, plain steps up to the first token the draft has again, one
                # forward verifies a short guess after it, one more the rest: half + 3 forwards
                # instead of one per token.
                assert engine.last_stats.steps <= half + 3, (row, name)
                realigned += 1
    assert realigned >= 4  # the longer clips exercised all four
    # What a session really offers: the partial of the audio without its last 0.5 s, on the fast window.
    heads = [a[: len(a) - 8000] for a in audios]
    partials = engine.decode(engine.encode(heads, "fast"), rows)
    hyps = engine.decode(encoded, rows, drafts=[p.tokens for p in partials])
    assert [h.tokens for h in hyps] == expected
    assert engine.last_stats.draft_accepted > 0


def test_no_speech_probability_is_whispers_with_and_without_a_draft(engine, clips):
    """openai-whisper's no_speech_prob: softmax after <|startoftranscript|> over the prompt, taken in
    the first forward of a plain decode and of a draft's verification alike."""
    audio, target = clips["en"], Target("en", "en")
    encoded = engine.encode([audio])
    (plain,) = engine.decode(encoded, [(0, target)])
    (drafted,) = engine.decode(encoded, [(0, target)], drafts=[plain.tokens])
    prompt = torch.tensor([engine.family.prompt(target)])
    with torch.inference_mode():
        logits = engine.model(input_features=engine.feature_inputs([audio])["input_features"],
                              decoder_input_ids=prompt).logits
    want = float(logits[0, 0].float().softmax(-1)[engine.family.no_speech_token])
    assert plain.no_speech_prob == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert drafted.no_speech_prob == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_fast_window_final_equals_offline_translate_on_the_same_setting(engine, clips):
    """Offline == streaming on the fast window: the same segment alone or in a batch of others."""
    langs = sorted(PHRASES)
    audios = [clips[lang] for lang in langs]
    batched = engine.transcribe(audios, [Target("en", "en")], window="fast")
    for audio, hyps in zip(audios, batched):
        assert engine.transcribe([audio], [Target("en", "en")], window="fast")[0][0].tokens == hyps[0].tokens
    (english,) = batched[langs.index("en")]
    assert english.window == "fast" and words(english.text) == words(PHRASES["en"][0])


def test_static_cache_decoder_gives_generate_tokens(engine, clips):
    """The CUDA-graphs path (static KV cache, step traced by dynamo) on CPU, batched and with drafts."""
    static = Engine(engine.model, engine.feature_extractor, engine.tokenizer, name="static", device=engine.device,
                    dtype=engine.dtype)
    static.enable_static_decoding(compile_mode=None, backend="eager")
    langs = sorted(PHRASES)
    audios = [clips[lang] for lang in langs]
    expected = [generate_tokens(engine, [clips[lang]], lang, "transcribe")[0] for lang in langs]
    rows = [(i, Target(lang, lang)) for i, lang in enumerate(langs)]
    encoded = static.encode(audios)
    assert [h.tokens for h in static.decode(encoded, rows)] == expected
    prefixes = [tokens[: len(tokens) // 2] for tokens in expected]  # what an earlier partial said
    assert [h.tokens for h in static.decode(encoded, rows, drafts=prefixes)] == expected
    assert static.static_decoder.compiled and static.static_decoder._caches


def test_a_prompt_steers_spelling_and_equals_generate_with_prompt_ids(engine):
    """Previous-text context (``prompt``/``hotwords``) changes the output, so exactness is against
    generate(prompt_ids=...) with the tokenizer's own get_prompt_ids, with and without a draft."""
    audio = espeak("We deployed Kubernetes with Grafana and Prometheus.", "en", 130)
    prompt = "kubectl, Grafana, Prometheus"
    ids = engine.tokenizer.get_prompt_ids(prompt, return_tensors="pt")
    assert ids.tolist() == engine.family.context_tokens(prompt)
    with torch.inference_mode():
        out = engine.model.generate(engine.feature_inputs([audio])["input_features"], language="en",
                                    task="transcribe", num_beams=1, do_sample=False, prompt_ids=ids)
    expected = [t for t in out[0].tolist() if t not in engine.family.eos_token_ids]
    target = Target("en", "en", prompt)
    (hyp,) = engine.transcribe([audio], [target])[0]
    assert hyp.tokens == expected
    assert "Grafana" in hyp.text and "Prometheus" in hyp.text, hyp.text
    (plain,) = engine.transcribe([audio], [Target("en", "en")])[0]
    assert "Grafana" not in plain.text, plain.text  # whisper-base alone mishears the names
    drafted = engine.decode(engine.encode([audio]), [(0, target)], drafts=[plain.tokens])[0]
    assert drafted.tokens == expected
