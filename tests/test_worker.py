"""EngineWorker: batching across requests, failure isolation, priorities, and a responsive event loop.

Mechanics run on the tiny random Whisper: its outputs are meaningless words but deterministic, which is
all that equality with ``engine.transcribe`` needs.
"""

import asyncio
import time

import numpy as np
import pytest

from streamsed.core.languages import Target, UnsupportedTarget
from streamsed.engine.loading import engine_from_model
from streamsed.engine.worker import EngineWorker
from tests.tiny_models import noise_audio, tiny_whisper

SHORT = 8  # tokens per row where the test is about mechanics, not output length
TARGETS = [Target("de", "de"), Target("de", "en")]


@pytest.fixture(scope="module")
def engine():
    return engine_from_model(*tiny_whisper(), device="cpu")


@pytest.fixture
def audios():
    return [noise_audio(1.0 + 0.5 * i, seed=i) for i in range(4)]


def tokens(hypotheses):
    return [(h.target, h.tokens) for h in hypotheses]


async def test_concurrent_requests_are_batched_and_match_single_transcription(engine, audios):
    worker = EngineWorker(engine, batch_window_ms=20, max_new_tokens=SHORT)
    worker.start()
    try:
        results = await asyncio.gather(*(worker.transcribe(audio, TARGETS) for audio in audios))
    finally:
        worker.stop()
    for audio, hypotheses in zip(audios, results):
        (single,) = engine.transcribe([audio], TARGETS, max_new_tokens=SHORT)
        assert tokens(hypotheses) == tokens(single)
    stats = worker.stats
    assert stats.max_encoder_batch > 1  # one encoder pass for several streams
    # More rows than one request has targets: rows of different requests ran in one decoder step.
    assert stats.max_decoder_rows > len(TARGETS)
    assert stats.max_decoder_step_rows > len(TARGETS)
    assert stats.requests == 4 and stats.failed == 0
    assert sum(size * count for size, count in stats.encoder_batches.items()) == 4


async def test_pending_requests_go_out_in_one_encode_and_one_decode(engine, audios):
    worker = EngineWorker(engine, max_new_tokens=SHORT)
    futures = [worker.submit(audio, TARGETS) for audio in audios]  # all pending before the thread runs
    worker.start()
    try:
        await asyncio.gather(*futures)
    finally:
        worker.stop()
    stats = worker.stats
    assert stats.batches == 1
    assert stats.encoder_batches == {4: 1}
    assert stats.decoder_batches == {8: 1}
    assert stats.max_decoder_step_rows == 8


async def test_max_batch_utterances_splits_the_queue(engine, audios):
    worker = EngineWorker(engine, max_batch_utterances=3, max_new_tokens=SHORT)
    futures = [worker.submit(audio, TARGETS[:1]) for audio in audios]
    worker.start()
    try:
        await asyncio.gather(*futures)
    finally:
        worker.stop()
    assert worker.stats.encoder_batches == {3: 1, 1: 1}


async def test_a_bad_target_fails_only_its_own_request(engine, audios):
    worker = EngineWorker(engine, max_new_tokens=SHORT)
    futures = [
        worker.submit(audios[0], [Target("de", "de")]),
        worker.submit(audios[1], [Target("de", "fr")]),  # Whisper cannot translate into French
        worker.submit(audios[2], [Target("en", "en")]),
    ]
    worker.start()
    try:
        first, bad, third = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(bad, UnsupportedTarget)
        assert tokens(first) == tokens(engine.transcribe([audios[0]], [Target("de", "de")], SHORT)[0])
        assert tokens(third) == tokens(engine.transcribe([audios[2]], [Target("en", "en")], SHORT)[0])
        # The worker survives: later requests are served.
        assert len(await worker.transcribe(audios[3], [Target("en", "en")])) == 1
    finally:
        worker.stop()
    assert worker.stats.failed == 1


class ExplodingEngine:
    """The tiny engine, except that encoding any utterance of exactly ``BAD`` samples raises."""

    BAD = 1234

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def encode(self, audios, window="exact"):
        if any(len(a) == self.BAD for a in audios):
            raise RuntimeError("boom")
        return self._engine.encode(audios, window)


async def test_a_model_error_reaches_only_the_request_that_caused_it(engine, audios):
    worker = EngineWorker(ExplodingEngine(engine), max_new_tokens=SHORT)
    futures = [worker.submit(audios[0], TARGETS), worker.submit(np.zeros(ExplodingEngine.BAD, np.float32), TARGETS),
               worker.submit(audios[1], TARGETS)]
    worker.start()
    try:
        good, bad, other = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        worker.stop()
    assert isinstance(bad, RuntimeError) and str(bad) == "boom"
    assert tokens(good) == tokens(engine.transcribe([audios[0]], TARGETS, SHORT)[0])
    assert tokens(other) == tokens(engine.transcribe([audios[1]], TARGETS, SHORT)[0])


async def test_a_newer_partial_with_the_same_key_supersedes_the_pending_one(engine, audios):
    worker = EngineWorker(engine, max_new_tokens=SHORT)
    old = worker.submit(audios[0], TARGETS, "partial", key="stream-a")
    other_stream = worker.submit(audios[1], TARGETS, "partial", key="stream-b")
    new = worker.submit(audios[2], TARGETS, "partial", key="stream-a")
    worker.start()
    try:
        assert await old is None
        assert all(len(result) == 2 for result in await asyncio.gather(other_stream, new))
    finally:
        worker.stop()
    assert worker.stats.superseded == 1
    assert worker.stats.encoder_batches == {2: 1}


async def test_a_final_supersedes_its_streams_pending_partial_and_is_never_superseded(engine, audios):
    worker = EngineWorker(engine, max_new_tokens=SHORT)
    partial = worker.submit(audios[0], TARGETS, "partial", key="stream-a")
    other = worker.submit(audios[1], TARGETS, "partial", key="stream-b")
    final = worker.submit(audios[2], TARGETS, "final", key="stream-a")  # the utterance closed: its partial is moot
    later = worker.submit(audios[3], TARGETS, "final", key="stream-a")
    worker.start()
    try:
        assert await partial is None
        assert all(len(result) == 2 for result in await asyncio.gather(other, final, later))
    finally:
        worker.stop()
    assert worker.stats.superseded == 1


async def test_finals_run_before_older_partials(engine, audios):
    worker = EngineWorker(engine, max_batch_utterances=1, max_new_tokens=SHORT)
    order = []
    futures = [worker.submit(audios[0], TARGETS, "partial", key="a"), worker.submit(audios[1], TARGETS, "partial"),
               worker.submit(audios[2], TARGETS, "final"), worker.submit(audios[3], TARGETS, "final")]
    for name, future in zip(["partial a", "partial", "final 1", "final 2"], futures):
        future.add_done_callback(lambda _, name=name: order.append(name))
    worker.start()
    try:
        await asyncio.gather(*futures)
    finally:
        worker.stop()
    assert order == ["final 1", "final 2", "partial a", "partial"]


async def test_a_cancelled_request_is_skipped(engine, audios):
    worker = EngineWorker(engine, max_new_tokens=SHORT)
    cancelled = worker.submit(audios[0], TARGETS)
    kept = worker.submit(audios[1], TARGETS)
    cancelled.cancel()
    worker.start()
    try:
        await kept
    finally:
        worker.stop()
    assert worker.stats.encoder_batches == {1: 1}


async def test_stop_drains_pending_work_and_is_idempotent(engine, audios):
    worker = EngineWorker(engine, max_new_tokens=SHORT)
    futures = [worker.submit(audio, TARGETS) for audio in audios]
    await asyncio.to_thread(worker.stop)  # never started: stop() still finishes what was accepted
    worker.stop()
    assert all(len(result) == 2 for result in await asyncio.gather(*futures))
    with pytest.raises(RuntimeError, match="stopped"):
        worker.submit(audios[0], TARGETS)
    with pytest.raises(RuntimeError):
        worker.start()


async def test_invalid_requests_are_refused_at_submit(engine, audios):
    worker = EngineWorker(engine)
    with pytest.raises(ValueError, match="kind"):
        worker.submit(audios[0], TARGETS, kind="draft")
    with pytest.raises(ValueError, match="target"):
        await worker.transcribe(audios[0], [])
    worker.stop()


async def test_event_loop_keeps_ticking_while_the_worker_decodes(engine):
    """Torch runs on the worker thread, so a 10 ms ticker on the loop sees only small gaps."""
    worker = EngineWorker(engine)  # full-length decoding: the random model rarely stops early
    worker.start()
    clips = [noise_audio(10.0, seed) for seed in range(8)]  # made before ticking: it runs on the loop
    ticks = []
    busy = True

    async def ticker():
        while busy:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0.05)
        work = [worker.transcribe(clip, TARGETS) for clip in clips]
        started = time.perf_counter()
        await asyncio.gather(*work)
        work_seconds = time.perf_counter() - started
        await asyncio.sleep(0.02)  # one more tick closes the window
    finally:
        busy = False
        await ticking
        worker.stop()
    # The ticks around the decode window only (with the one just before and just after it).
    during = [t for t in ticks if started - 0.015 <= t <= started + work_seconds + 0.015]
    assert len(during) > 10
    gaps = np.diff(during)
    stats = worker.stats
    print(f"\nworker busy {work_seconds:.3f} s, longest batch {stats.max_batch_seconds:.3f} s, "
          f"batches {stats.encoder_batches}, max tick gap {gaps.max() * 1000:.1f} ms over {len(gaps)} ticks")
    assert stats.max_batch_seconds > 0.3, "the work must be heavy enough to show anything"
    assert gaps.max() < 0.1
    assert gaps.max() < stats.max_batch_seconds / 3


async def test_a_final_preempts_a_running_partial_batch(audios):
    """A final arriving mid-decode stops a partials-only batch before its next step."""
    import threading

    engine = engine_from_model(*tiny_whisper(), device="cpu")
    engine.family.eos_token_ids = []  # no early EOS: an unpreempted partial runs all its steps
    decoding = threading.Event()
    real_step = engine.family.step

    def slow_step(*args, **kwargs):
        decoding.set()
        time.sleep(0.02)
        return real_step(*args, **kwargs)

    engine.family.step = slow_step
    worker = EngineWorker(engine, max_new_tokens=40)
    worker.start()
    try:
        partial = worker.submit(audios[0], TARGETS[:1], "partial", key="stream-a")
        assert await asyncio.to_thread(decoding.wait, 10)
        final = await worker.transcribe(audios[1], TARGETS[:1], "final")
        assert await partial is None
    finally:
        worker.stop()
    assert worker.stats.preempted == 1
    assert engine.last_stats.steps == 40  # the final itself ran to the end
    assert len(final[0].tokens) == 40
    # A partial with no final waiting is never preempted.
    worker = EngineWorker(engine, max_new_tokens=5)
    worker.start()
    try:
        assert await worker.transcribe(audios[0], TARGETS[:1], "partial", key="stream-a") is not None
    finally:
        worker.stop()
    assert worker.stats.preempted == 0


def test_an_int8_replica_shares_the_packed_weights(engine):
    import torch

    from streamsed.engine.loading import _int8_engine
    from tests.tiny_models import noise_audio

    int8 = _int8_engine(*tiny_whisper(), name="tiny-int8", window_margin_s=5.0)
    twin = int8.replica()
    packed = [(a, b) for a, b in zip(int8.model.modules(), twin.model.modules())
              if hasattr(a, "_packed_params") and not isinstance(a._packed_params, torch.nn.Module)]
    assert packed and all(a is not b and a._packed_params is b._packed_params for a, b in packed)
    audio = noise_audio(1.0, seed=3)
    assert tokens(twin.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0]) == \
        tokens(int8.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0])


def test_a_replica_shares_the_weights_but_not_the_modules(engine):
    twin = engine.replica()
    assert twin.model is not engine.model and twin.model.config is not engine.model.config
    assert twin.tokenizer is not engine.tokenizer and twin.family.model is twin.model
    for (name, ours), (_, theirs) in zip(engine.model.named_parameters(), twin.model.named_parameters()):
        assert ours.data_ptr() == theirs.data_ptr(), name  # the same tensors: no second copy of the weights
    twin.model.set_attn_implementation("eager")  # what word timings do to their engine for one call
    assert engine.model.config._attn_implementation != "eager"


async def finals_then_partials(worker, audios):
    """Queue a final and then a partial of every audio before the worker starts; their hypotheses."""
    futures = [worker.submit(audio, TARGETS) for audio in audios]
    futures += [worker.submit(audio, TARGETS, "partial", key=i) for i, audio in enumerate(audios)]
    worker.start()
    try:
        return await asyncio.gather(*futures)
    finally:
        worker.stop()


def scored(hypotheses):
    return [(h.target, h.tokens, h.avg_logprob) for h in hypotheses]


def test_an_int8_twin_quantizes_the_linear_layers_and_shares_the_rest(engine):
    import torch

    from streamsed.engine.loading import _int8_engine

    audio = noise_audio(1.5, seed=5)
    before = scored(engine.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0])
    twin = engine.int8_twin()
    assert twin.quantized == "int8" and twin.model is not engine.model
    ours = dict(engine.model.named_parameters())
    theirs = dict(twin.model.named_parameters())
    assert theirs and all(ours[name].data_ptr() == tensor.data_ptr() for name, tensor in theirs.items())
    linear = [name for name, m in engine.model.named_modules() if isinstance(m, torch.nn.Linear)]
    twin_modules = dict(twin.model.named_modules())
    assert linear and all(not isinstance(twin_modules[name], torch.nn.Linear) for name in linear)
    assert all(isinstance(m, torch.nn.Linear) for name, m in engine.model.named_modules() if name in linear)
    # The float engine is untouched, and the twin is what loading the model as int8 gives.
    assert scored(engine.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0]) == before
    int8 = _int8_engine(*tiny_whisper(), name="tiny-int8", window_margin_s=5.0)
    assert scored(twin.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0]) == \
        scored(int8.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0])
    with pytest.raises(ValueError, match="already int8"):
        twin.int8_twin()


@pytest.mark.parametrize("lanes", [1, 2])
async def test_int8_partials_run_on_the_twin_and_finals_on_the_model(engine, audios, lanes):
    # One request per batch, so each result is bitwise that of transcribing its audio alone (int8
    # quantizes activations per batch, and float32 batches round differently in the last bits).
    worker = EngineWorker(engine, 1, max_new_tokens=SHORT, lanes=lanes, partial_dtype="int8")
    assert worker.partial_dtype == "int8"
    results = await finals_then_partials(worker, audios)
    twin = engine.int8_twin()
    finals, partials = results[: len(audios)], results[len(audios):]
    gaps = []
    for audio, final, partial in zip(audios, finals, partials):
        float32 = engine.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0]
        int8 = twin.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0]
        assert tokens(final) == tokens(float32) and tokens(partial) == tokens(int8)
        # A lane's one torch thread rounds a little differently from this thread's team.
        assert [h.avg_logprob for h in final] == pytest.approx([h.avg_logprob for h in float32], rel=1e-5)
        assert [h.avg_logprob for h in partial] == pytest.approx([h.avg_logprob for h in int8], rel=1e-5)
        gaps += [abs(a.avg_logprob - b.avg_logprob) for a, b in zip(float32, int8)]
    assert max(gaps) > 1e-3  # not vacuous: int8 scores are far from float32 ones on these inputs


async def test_int8_first_runs_a_segments_first_partial_on_the_twin_and_later_ones_on_the_model(engine, audios):
    worker = EngineWorker(engine, 1, max_new_tokens=SHORT, partial_dtype="auto")
    assert worker.partial_dtype == "int8-first"
    audio = audios[0]
    first = worker.submit(audio, TARGETS, "partial", key="a")  # its segment had no partial yet
    later = worker.submit(audio, TARGETS, "partial", key="b", shown=time.monotonic())  # it had one
    worker.start()
    try:
        first, later = await asyncio.gather(first, later)
    finally:
        worker.stop()
    float32 = engine.transcribe([audio], TARGETS, max_new_tokens=SHORT)[0]
    int8 = engine.int8_twin().transcribe([audio], TARGETS, max_new_tokens=SHORT)[0]
    assert max(abs(a.avg_logprob - b.avg_logprob) for a, b in zip(float32, int8)) > 1e-3  # tellable apart
    assert [h.avg_logprob for h in first] == pytest.approx([h.avg_logprob for h in int8], rel=1e-5)
    assert [h.avg_logprob for h in later] == pytest.approx([h.avg_logprob for h in float32], rel=1e-5)
    assert worker.stats.int8_partials == 1
    # Each kind of partial has its own measured cost: a twin's partial is not priced as a float one.
    assert set(worker.costs) == {"final", "partial", "file", "partial_int8"}
    assert worker.costs["partial"] > 0 and worker.costs["partial_int8"] > 0


def test_partial_dtype_auto_is_int8_first_for_float32_on_the_cpu_only(engine):
    from streamsed.engine.loading import _int8_engine
    from streamsed.engine.worker import resolve_partial_dtype

    assert resolve_partial_dtype(engine, "auto") == "int8-first"
    assert resolve_partial_dtype(engine, "same") == "same"
    assert resolve_partial_dtype(engine, "int8") == "int8"
    int8 = _int8_engine(*tiny_whisper(), name="tiny-int8", window_margin_s=5.0)
    assert resolve_partial_dtype(int8, "auto") == resolve_partial_dtype(int8, "int8") == "same"
    half = engine_from_model(*tiny_whisper(), device="cpu", dtype="bfloat16")
    assert resolve_partial_dtype(half, "auto") == "same"
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        resolve_partial_dtype(half, "int8")
    with pytest.raises(ValueError, match="partial_dtype must be"):
        EngineWorker(engine, partial_dtype="int4")
    assert EngineWorker(engine).partial_dtype == "same"  # the worker's own default; the daemon passes auto


async def test_two_lanes_give_the_hypotheses_of_one_and_use_both_threads(engine, audios, monkeypatch):
    import threading

    import torch

    threads_before = torch.get_num_threads()
    worker = EngineWorker(engine, max_new_tokens=SHORT, lanes=2)
    seen = set()
    for lane, _ in worker._engines:  # record which thread ran each encoder pass (partials: same engine)
        original = lane.encode

        def encode(audios, window="exact", original=original):
            seen.add(threading.current_thread().name)
            time.sleep(0.05)  # long enough that the other lane takes the next final meanwhile
            return original(audios, window)

        monkeypatch.setattr(lane, "encode", encode)
    results = await finals_then_partials(worker, audios)
    assert seen == {"streamsed-engine-0", "streamsed-engine-1"}
    monkeypatch.undo()
    for audio, hypotheses in zip(audios + audios, results):
        (single,) = engine.transcribe([audio], TARGETS, max_new_tokens=SHORT)
        assert tokens(hypotheses) == tokens(single)
    assert worker.stats.requests == 8
    assert torch.get_num_threads() == threads_before  # the lanes gave the process its thread count back


def test_lanes_auto_is_two_on_a_multicore_cpu(engine, monkeypatch):
    from streamsed.engine import worker as worker_module

    monkeypatch.setattr(worker_module.os, "cpu_count", lambda: 2)
    assert worker_module.auto_lanes(engine) == 2
    monkeypatch.setattr(worker_module.os, "cpu_count", lambda: 1)
    assert worker_module.auto_lanes(engine) == 1
    with pytest.raises(ValueError, match="lanes"):
        EngineWorker(engine, lanes=-1)


async def test_a_partial_drafts_its_segment_s_final_through_the_draft_source(engine, audios):
    worker = EngineWorker(engine, max_new_tokens=SHORT)
    worker.start()
    try:
        segment: dict = {}  # what a session keeps per segment
        partial = await worker.submit(audios[1][:16000], TARGETS, "partial", draft_source=segment)
        assert segment == {h.target: h.tokens for h in partial}  # written by the worker, not the caller
        final = await worker.submit(audios[1], TARGETS, "final", draft_source=segment)
    finally:
        worker.stop()
    assert [h.draft_offered for h in final] == [min(len(h.tokens), SHORT) for h in partial] != [0, 0]
    assert tokens(final) == tokens(engine.transcribe([audios[1]], TARGETS, max_new_tokens=SHORT)[0])


async def test_a_final_reads_its_draft_source_after_its_encoder_pass(engine, audios, monkeypatch):
    """A partial that finishes on another lane while a final encodes still drafts that final."""
    segment = {TARGETS[0]: [11, 12]}
    encode = engine.encode

    def encode_while_a_partial_finishes(*args, **kwargs):
        encoded = encode(*args, **kwargs)
        segment[TARGETS[0]] = [11, 12, 13, 14, 15]
        segment[TARGETS[1]] = [21, 22, 23]
        return encoded

    monkeypatch.setattr(engine, "encode", encode_while_a_partial_finishes)
    worker = EngineWorker(engine, max_new_tokens=SHORT)
    worker.start()
    try:
        final = await worker.submit(audios[0], TARGETS, "final", draft_source=segment)
    finally:
        worker.stop()
    assert [h.draft_offered for h in final] == [5, 3]
    monkeypatch.undo()
    assert tokens(final) == tokens(engine.transcribe([audios[0]], TARGETS, max_new_tokens=SHORT)[0])
