"""The real default model (Whisper base, converted from the PyPI CTranslate2 packages).

The engine must give generate()'s tokens on real speech in several languages, single and batched.
"""

import pytest
import torch

from streamsed.engine.engine import Target
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
