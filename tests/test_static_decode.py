"""The static-cache decoder (the CUDA-graphs path) gives the dynamic loop's tokens, i.e. generate()'s.

CI has no GPU, so these run it on CPU: eagerly, and traced by dynamo (``backend="eager"`` compiles
the same graph CUDA graphs would capture, without Triton). The tiny model's EOS is chosen so that
rows finish at different steps: the static loop keeps finished rows in the batch instead of pruning.
"""

import logging

import torch
import torch._dynamo.utils

from streamsed.engine.engine import Target
from streamsed.engine.loading import engine_from_model
from streamsed.engine.static_decode import bucket_size
from tests import tiny_models as tm
from tests.test_engine_parity import MAX_NEW, draft_variants, pick_staggered_eos, reference

TARGET = Target("de", "de")


def tiny_engine_and_expected():
    model, fe, tokenizer = tm.tiny_whisper()
    engine = engine_from_model(model, fe, tokenizer, device="cpu")
    audios = [tm.noise_audio(s, 30 + seed) for seed, s in enumerate([1.0, 2.5, 0.4])]
    rollout = reference(model, engine, audios, 0, language="de", task="transcribe")
    eos = pick_staggered_eos(rollout, avoid=set(engine.family.suppressed_tokens()[0]))
    model.generation_config.eos_token_id = eos
    engine.family.eos_token_ids = [eos]
    expected = reference(model, engine, audios, 0, language="de", task="transcribe")
    assert len({len(e) for e in expected}) > 1, "rows must finish at different steps"
    return engine, audios, expected


def assert_static_parity(engine, audios, expected):
    assert [h[0].tokens for h in engine.transcribe(audios, [TARGET], max_new_tokens=MAX_NEW)] == expected
    for audio, tokens in zip(audios[:2], expected):  # batch 1 and a padded batch of 2 -> 2 buckets
        assert engine.transcribe([audio], [TARGET], max_new_tokens=MAX_NEW)[0][0].tokens == tokens
    encoded = engine.encode(audios)
    rows = [(u, TARGET) for u in range(len(audios))]
    vocab = engine.model.config.vocab_size
    per_row = [draft_variants(e, vocab, engine.family.eos_token_ids[0], seed) for seed, e in enumerate(expected)]
    for name in per_row[0]:  # after a verified draft the static cache starts from the draft's K/V
        hyps = engine.decode(encoded, rows, MAX_NEW, drafts=[v[name] for v in per_row])
        assert [h.tokens for h in hyps] == expected, name


def test_bucket_sizes_are_powers_of_two():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]


def test_static_cache_eager_equals_generate():
    engine, audios, expected = tiny_engine_and_expected()
    engine.enable_static_decoding(compile_mode=None)
    assert not engine.static_decoder.compiled
    assert_static_parity(engine, audios, expected)
    assert (4, 1500) in engine.static_decoder._caches  # 3 rows ran padded to 4 on the static cache


def test_compiled_step_traces_without_graph_breaks_and_equals_generate():
    engine, audios, expected = tiny_engine_and_expected()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine.enable_static_decoding(compile_mode=None, backend="eager")
    assert engine.static_decoder.compiled
    assert_static_parity(engine, audios, expected)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    # One graph per batch bucket (4, 1 and 2 rows here), reused at every step: what CUDA graphs replay.
    assert counters["stats"]["unique_graphs"] <= 3
    assert engine.static_decoder.compiled


def test_a_failing_compiled_step_falls_back_to_eager(caplog):
    engine, audios, expected = tiny_engine_and_expected()
    engine.enable_static_decoding(compile_mode=None, backend="eager")

    def broken(*args):
        raise RuntimeError("no Triton here")

    engine.static_decoder._step = broken
    with caplog.at_level(logging.WARNING):
        assert [h[0].tokens for h in engine.transcribe(audios, [TARGET], max_new_tokens=MAX_NEW)] == expected
    assert not engine.static_decoder.compiled
    assert "decoding eagerly" in caplog.text
