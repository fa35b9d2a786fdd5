"""``streamsed bench decode``: the engine's greedy decoder against ``generate()`` and CTranslate2.

All contenders decode the same VAD segments (``streamsed.translate.segment_audio``, as
``streamsed translate`` cuts them) of one audio, in the same batches, with the same Whisper prompt
(``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``) and the same weights:

- ``engine``: ``Engine.decode`` on the output of ``Engine.encode``;
- ``generate``: ``model.generate(encoder_outputs=..., num_beams=1, do_sample=False)`` on the same
  model object and the same encoder output (the baseline every ratio refers to);
- ``ct2_float32`` / ``ct2_int8``: ``ctranslate2.models.Whisper.generate(beam_size=1)`` (the call
  faster-whisper makes) on the encoder output of ``Whisper.encode`` for the same log-mel features,
  ``intra_threads`` set to torch's thread count.

Encoder time (log-mel features included) is measured once per backend, decode time per contender.
Every time is the best of ``--repeat`` runs after one warm-up run. See bench/README.md.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

BATCH_SIZE = 8  # what translate_segments uses
SILENCE_S = 0.8  # between synthesized sentences: longer than the VAD's end_silence_ms
SENTENCES = (
    "Good morning, and welcome to the weekly project meeting.",
    "The new release fixes three bugs in the audio pipeline.",
    "Please send your questions to the support team before Friday.",
    "The weather will be sunny with a light breeze in the afternoon.",
    "Thank you for listening, and see you next week.",
)
CT2_COMPUTE_TYPES = ("float32", "int8")
_CT2_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json")


@dataclass
class Contender:
    """Best-of-N timings and output of one contender over all batches."""

    label: str
    encoder_seconds: float  # best run; engine and generate() share the torch encoder
    decode_seconds: float  # best run
    decode_runs: list[float]
    encoder_runs: list[float]
    tokens: list[list[int]]  # generated tokens per segment, without prompt and EOS
    texts: list[str]
    extra: dict = field(default_factory=dict)

    @property
    def token_count(self) -> int:
        return sum(len(t) for t in self.tokens)


# -- audio --------------------------------------------------------------------------------------------
def synthesize_speech(sentences=SENTENCES, voice: str = "en-us", silence_s: float = SILENCE_S) -> np.ndarray:
    """English speech from espeak-ng at 16 kHz, one sentence after another with silence between."""
    import soundfile as sf
    import soxr

    from ..core.audio import MODEL_SAMPLE_RATE

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: install it or pass --audio FILE")
    pause = np.zeros(int(silence_s * MODEL_SAMPLE_RATE), dtype=np.float32)
    pieces = []
    for sentence in sentences:
        wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", sentence], capture_output=True, check=True).stdout
        audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
        pieces += [soxr.resample(audio, rate, MODEL_SAMPLE_RATE).astype(np.float32), pause]
    return np.concatenate([pause, *pieces])


# -- CTranslate2 model directory ---------------------------------------------------------------------
def ct2_model_dir(reference: str) -> Path | None:
    """A directory ``ctranslate2.models.Whisper`` loads for ``reference``; None if there is none.

    The default model ships as two halves of model.bin in two packages: they are joined once into
    ``cache_dir()/ct2/whisper-base-<fingerprint>``. A CTranslate2 directory is used as it is.
    """
    from ..engine.loading import DEFAULT_MODEL, is_ct2_dir

    if reference == DEFAULT_MODEL:
        return materialize_default_ct2()
    path = Path(reference).expanduser()
    return path if path.is_dir() and is_ct2_dir(path) else None


def materialize_default_ct2() -> Path:
    """Join the default model's model.bin halves (plus its json/vocabulary) into the cache, once."""
    from ..engine.default_model import DEFAULT_MODEL, cache_dir, ct2_default_sources, fingerprint

    source = ct2_default_sources()
    root = cache_dir() / "ct2"
    target = root / f"{DEFAULT_MODEL}-{fingerprint(source)}"
    size = sum(part.stat().st_size for part in source.weights)
    if _is_ct2_copy(target, size):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for part in source.weights:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        for name in _CT2_FILES:
            if (source.config_json.parent / name).is_file():
                shutil.copy(source.config_json.parent / name, tmp / name)
        tmp.chmod(0o755)
        if target.exists():  # incomplete leftover of something else: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_ct2_copy(target, size):  # another process finished first
            return target
        raise
    return target


def _is_ct2_copy(path: Path, size: int) -> bool:
    model = path / "model.bin"
    return model.is_file() and model.stat().st_size == size and (path / "config.json").is_file()


# -- timing -------------------------------------------------------------------------------------------
@dataclass
class Timed:
    runs: list[float]  # seconds of every timed run
    result: object  # what the fastest run returned

    @property
    def best(self) -> float:
        return min(self.runs)


def time_interleaved(fns: dict[str, Callable[[], object]], repeat: int, sync: Callable[[], None]) -> dict[str, Timed]:
    """Best-of-``repeat`` timing of each function after one untimed warm-up call of each.

    Runs go round-robin (a, b, c, a, b, c, ...) so that load from other processes hits every
    contender alike instead of whichever happened to run while it lasted.
    """
    for fn in fns.values():
        fn()
    sync()
    timed = {key: Timed([], None) for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            started = time.perf_counter()
            result = fn()
            sync()
            seconds = time.perf_counter() - started
            if not timed[key].runs or seconds < timed[key].best:
                timed[key].result = result
            timed[key].runs.append(seconds)
    return timed


def _batches(items: list, size: int = BATCH_SIZE) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _generated(sequence: list[int], prompt: list[int], stop: set[int]) -> list[int]:
    """The generated tokens of one output row: the prompt (if echoed) and EOS/padding removed."""
    if sequence[: len(prompt)] == prompt:
        sequence = sequence[len(prompt) :]
    for i, token in enumerate(sequence):
        if token in stop:
            return sequence[:i]
    return sequence


# -- contenders: each is an encode function (audio batches -> encoder output per batch) and a
# -- decode function (that encoder output -> generated tokens per segment) ---------------------------
def engine_decode(engine, encoded: list, target) -> tuple[list[list[int]], dict]:
    """``Engine.decode`` batch by batch; the DecodeStats of all batches summed."""
    tokens, stats = [], {"steps": 0, "tokens": 0, "seconds": 0.0, "batch_sizes": []}
    for enc in encoded:
        tokens += [h.tokens for h in engine.decode(enc, [(i, target) for i in range(len(enc))])]
        last = engine.last_stats
        stats["steps"] += last.steps
        stats["tokens"] += last.tokens
        stats["seconds"] += last.seconds
        stats["batch_sizes"] += last.batch_sizes
    return tokens, stats


PARTIAL_LAG_S = 0.5  # a final's draft is the last partial: the segment minus its last chunk_ms


def partial_drafts(engine, audio_batches: list, target) -> list[list[list[int]]]:
    """What a live session holds when a segment closes: the tokens of its last partial, decoded
    from the segment minus its last ``PARTIAL_LAG_S`` on the fast window (partials' default)."""
    cut = int(PARTIAL_LAG_S * engine.sample_rate)
    drafts = []
    for batch in audio_batches:
        heads = [a[: max(len(a) - cut, cut)] for a in batch]
        encoded = engine.encode(heads, "fast")
        drafts.append([h.tokens for h in engine.decode(encoded, [(i, target) for i in range(len(heads))])])
    return drafts


def engine_draft_decode(engine, encoded: list, target, drafts: list) -> tuple[list[list[int]], dict]:
    """``Engine.decode`` with each segment's partial as draft; tokens must equal the plain decode."""
    tokens, stats = [], {"steps": 0, "draft_offered": 0, "draft_accepted": 0}
    for enc, batch_drafts in zip(encoded, drafts):
        tokens += [h.tokens for h in engine.decode(enc, [(i, target) for i in range(len(enc))], drafts=batch_drafts)]
        for key in stats:
            stats[key] += getattr(engine.last_stats, key)
    return tokens, stats


def generate_decode(engine, encoded: list, target) -> list[list[int]]:
    """``model.generate`` greedy on the engine's encoder output (``encoder_outputs=``), batch by batch."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    prompt = engine.family.prompt(target)
    stop = set(engine.family.eos_token_ids) | {engine.family.pad_token_id}
    kwargs = {"num_beams": 1, "do_sample": False}
    if engine.family.multilingual:
        kwargs.update(language=target.source_lang, task="transcribe")
    tokens = []
    with torch.inference_mode():
        for enc in encoded:
            out = engine.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc.states), **kwargs)
            sequences = out.sequences if hasattr(out, "sequences") else out
            tokens += [_generated(row, prompt, stop) for row in sequences.tolist()]
    return tokens


def load_ct2(model_dir: Path, compute_type: str, engine):
    """``ctranslate2.models.Whisper`` with as many threads as torch uses, on the engine's device."""
    import ctranslate2
    import torch

    device = "cuda" if engine.device.type == "cuda" else "cpu"
    return ctranslate2.models.Whisper(
        str(model_dir), device=device, compute_type=compute_type, inter_threads=1, intra_threads=torch.get_num_threads()
    )


def ct2_encode(model, engine, audio_batches: list) -> list:
    """The same log-mel features as ``Engine.encode`` computes, through CTranslate2's encoder."""
    import ctranslate2

    name = engine.feature_extractor.model_input_names[0]
    features = (engine.feature_inputs(b)[name].numpy().astype(np.float32) for b in audio_batches)
    return [model.encode(ctranslate2.StorageView.from_array(f), to_cpu=False) for f in features]


def ct2_decode(model, encoded: list, prompt: list[int]) -> list[list[int]]:
    """Greedy ``Whisper.generate`` on encoder output (faster-whisper's call with beam_size=1)."""
    tokens = []
    for enc in encoded:
        results = model.generate(
            enc, [prompt] * enc.shape[0], beam_size=1, suppress_blank=True, suppress_tokens=[-1], max_length=448
        )
        tokens += [r.sequences_ids[0] for r in results]
    return tokens


def run_contenders(engine, audio_batches: list, target, ct2_dir: Path | None, repeat: int) -> dict[str, Contender]:
    """Time every encoder, then every decoder on its encoder's output; both phases round-robin."""
    import torch

    from ..engine.worker import resolve_partial_dtype

    sync = (lambda: torch.cuda.synchronize(engine.device)) if engine.device.type == "cuda" else (lambda: None)
    ct2_models = {ct: load_ct2(ct2_dir, ct, engine) for ct in CT2_COMPUTE_TYPES} if ct2_dir else {}
    prompt = engine.family.prompt(target)

    encoders = {"torch": lambda: [engine.encode(b) for b in audio_batches]}
    for ct, model in ct2_models.items():
        encoders[f"ct2_{ct}"] = lambda model=model: ct2_encode(model, engine, audio_batches)
    enc = time_interleaved(encoders, repeat, sync)

    drafts = partial_drafts(engine, audio_batches, target)
    # Live finals are decoded one by one as their utterances end: the same segments, batch size 1, on
    # the window the daemon uses for finals by default (auto: fast on CPU), generate() on the same states.
    singles = [[a] for batch in audio_batches for a in batch]
    single_encoded = [engine.encode(b, "auto") for b in singles]
    single_drafts = partial_drafts(engine, singles, target)
    # Drafts from int8 partials: partial_dtype int8, or under the CPU default (auto: int8-first) a
    # segment whose only partial was its first; its later partials run on the model itself.
    twin = engine.int8_twin() if resolve_partial_dtype(engine, "auto") != "same" else None
    int8_drafts = partial_drafts(twin, singles, target) if twin is not None else None
    decoders = {
        "engine": lambda: engine_decode(engine, enc["torch"].result, target),
        "engine_drafts": lambda: engine_draft_decode(engine, enc["torch"].result, target, drafts),
        "generate": lambda: generate_decode(engine, enc["torch"].result, target),
        "final_generate": lambda: generate_decode(engine, single_encoded, target),
        "final_engine": lambda: engine_decode(engine, single_encoded, target),
        "final_drafts": lambda: engine_draft_decode(engine, single_encoded, target, single_drafts),
    }
    if int8_drafts is not None:
        decoders["final_int8_drafts"] = lambda: engine_draft_decode(engine, single_encoded, target, int8_drafts)
    for ct, model in ct2_models.items():
        decoders[f"ct2_{ct}"] = lambda key=f"ct2_{ct}", model=model: ct2_decode(model, enc[key].result, prompt)
    dec = time_interleaved(decoders, repeat, sync)

    engine_tokens, stats = dec["engine"].result
    stats["ms_per_step"] = 1000 * stats["seconds"] / max(stats["steps"], 1)
    stats["ms_per_token"] = 1000 * stats["seconds"] / max(stats["tokens"], 1)
    stats["max_batch_size"] = max(stats["batch_sizes"], default=0)
    threads = {"intra_threads": torch.get_num_threads(), "inter_threads": 1}
    draft_tokens, draft_stats = dec["engine_drafts"].result
    final_tokens, final_stats = dec["final_engine"].result
    final_draft_tokens, final_draft_stats = dec["final_drafts"].result
    window = single_encoded[0].window
    finals = {
        "final_generate": (f"finals one by one ({window} window): generate()", enc["torch"],
                           dec["final_generate"].result, {"window": window}),
        "final_engine": (f"finals one by one ({window} window): engine", enc["torch"], final_tokens,
                         {"decode_stats": {"steps": final_stats["steps"]}, "window": window}),
        "final_drafts": (f"finals one by one ({window} window): engine, last partial as draft", enc["torch"],
                         final_draft_tokens, {"draft_stats": final_draft_stats, "window": window}),
    }
    if int8_drafts is not None:
        tokens_8, stats_8 = dec["final_int8_drafts"].result
        finals["final_int8_drafts"] = (f"finals one by one ({window} window): engine, last int8 partial as draft",
                                       enc["torch"], tokens_8, {"draft_stats": stats_8, "window": window})
    outputs = {
        "engine": ("streamsed engine", enc["torch"], engine_tokens, {"decode_stats": stats}),
        "engine_drafts": ("streamsed engine, last partial as draft", enc["torch"], draft_tokens,
                          {"draft_stats": draft_stats}),
        "generate": ("transformers generate()", enc["torch"], dec["generate"].result, {}),
        **{
            f"ct2_{ct}": (f"ctranslate2 {ct}", enc[f"ct2_{ct}"], dec[f"ct2_{ct}"].result, {"compute_type": ct, **threads})
            for ct in ct2_models
        },
        **finals,
    }
    decode = lambda ids: [engine.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]  # noqa: E731
    return {
        key: Contender(label, encoder.best, dec[key].best, dec[key].runs, encoder.runs, tokens, decode(tokens), extra)
        for key, (label, encoder, tokens, extra) in outputs.items()
    }


# -- report ----------------------------------------------------------------------------------------
def load_average() -> float | None:
    """1-minute load average (other processes skew timings; the report shows it), None if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info(engine) -> dict:
    import ctranslate2
    import torch
    import transformers

    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ctranslate2": ctranslate2.__version__,
        "python": platform.python_version(),
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
    }
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"machine: {info['cpu']} ({info['cpu_count']} CPUs){gpu}; torch {info['torch']} "
        f"({info['torch_threads']} threads), transformers {info['transformers']}, ctranslate2 {info['ctranslate2']}, "
        f"python {info['python']}; device {info['device']}, dtype {info['dtype']}{_load_text(info)}"
    )


def _load_text(info: dict) -> str:
    before, after = info.get("load_average_1min") or (None, None)
    return "" if before is None else f"; load average {before} before, {after} after"


def markdown_table(contenders: dict[str, Contender], engine_texts: list[str]) -> str:
    lines = [
        "| contender | encoder (s) | decode (s) | decode vs generate() | encoder+decode vs generate() "
        "| tokens | decode ms/token | text = engine (finals: = generate()) |",
        "|---|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for key, c in contenders.items():
        # Rows "finals one by one" decode each segment alone: their baseline is generate() alone too.
        base = contenders["final_generate"] if key.startswith("final_") else contenders["generate"]
        base_total = base.encoder_seconds + base.decode_seconds
        total = c.encoder_seconds + c.decode_seconds
        baseline = key in ("generate", "final_generate")
        ratio = "1.00x (baseline)" if baseline else f"{c.decode_seconds / base.decode_seconds:.2f}x"
        lines.append(
            f"| {c.label} | {c.encoder_seconds:.3f} | {c.decode_seconds:.3f} | {ratio} | {total / base_total:.2f}x "
            f"| {c.token_count} | {1000 * c.decode_seconds / max(c.token_count, 1):.1f} "
            f"| {'yes' if c.texts == (base.texts if key.startswith('final_') else engine_texts) else 'no'} |"
        )
    return "\n".join(lines)


def to_json(info, audio_info, repeat, contenders: dict[str, Contender]) -> dict:
    engine_texts = contenders["engine"].texts
    return {
        "date": date.today().isoformat(),
        "machine": info,
        "audio": audio_info,
        "batch_size": BATCH_SIZE,
        "repeat": repeat,
        "baseline": "generate",
        "texts_identical_engine_generate": contenders["generate"].texts == engine_texts,
        "contenders": {
            key: {
                "label": c.label,
                "encoder_seconds": c.encoder_seconds,
                "decode_seconds": c.decode_seconds,
                "decode_runs": c.decode_runs,
                "encoder_runs": c.encoder_runs,
                "decode_ratio_vs_generate": c.decode_seconds / contenders["generate"].decode_seconds,
                "tokens": c.token_count,
                "same_text_as_engine": c.texts == engine_texts,
                "texts": c.texts,
                **c.extra,
            }
            for key, c in contenders.items()
        },
    }


def report(info, audio_info, repeat, contenders: dict[str, Contender]) -> str:
    engine, generate = contenders["engine"], contenders["generate"]
    stats = engine.extra["decode_stats"]
    segs = audio_info["segment_seconds"]
    lengths = f"{segs[0]} s" if len(segs) == 1 else f"{min(segs)}-{max(segs)} s"
    lines = [
        f"{date.today().isoformat()} {machine_line(info)}",
        f"audio: {audio_info['source']}, {audio_info['seconds']} s, {len(segs)} VAD segment(s) "
        f"of {lengths}, decoded in batches of {audio_info['batches']}; best of {repeat} "
        f"runs (round-robin) after 1 warm-up; encoder times include log-mel features, "
        f"engine and generate() share one torch encoder",
        "",
        markdown_table(contenders, engine.texts),
        "",
        f"engine: {engine.decode_seconds / generate.decode_seconds:.2f}x the decode time "
        f"of generate(); {stats['steps']} batched decoder steps (up to {stats['max_batch_size']} rows), "
        f"{stats['ms_per_step']:.1f} ms/step, {stats['ms_per_token']:.1f} ms per generated token (DecodeStats)",
    ]
    drafted = contenders["engine_drafts"]
    ds = drafted.extra["draft_stats"]
    lines.append(
        f"engine with drafts: {drafted.decode_seconds / generate.decode_seconds:.2f}x the decode time of generate(); "
        f"{ds['draft_accepted']} of {ds['draft_offered']} draft tokens accepted, {ds['steps']} decoder forwards "
        f"(without drafts {stats['steps']}); drafts = each segment's last partial "
        f"(segment minus its last {PARTIAL_LAG_S} s, fast window)"
    )
    one, drafted_one = contenders["final_generate"], contenders["final_drafts"]
    fs = drafted_one.extra["draft_stats"]
    lines.append(
        f"finals one by one (each segment alone, as the daemon decodes a final when its utterance ends): "
        f"engine with the last partial as draft {drafted_one.decode_seconds / one.decode_seconds:.2f}x the decode "
        f"time of generate() on the same segments ({fs['draft_accepted']} of {fs['draft_offered']} draft tokens "
        f"accepted, {fs['steps']} decoder forwards; engine without drafts "
        f"{contenders['final_engine'].decode_seconds / one.decode_seconds:.2f}x)"
    )
    if "final_int8_drafts" in contenders:
        int8_one = contenders["final_int8_drafts"]
        fs = int8_one.extra["draft_stats"]
        lines.append(
            f"the same with drafts from int8 partials (partial_dtype int8, or a segment's first partial): "
            f"{int8_one.decode_seconds / one.decode_seconds:.2f}x ({fs['draft_accepted']} of {fs['draft_offered']} "
            f"draft tokens accepted, {fs['steps']} decoder forwards)"
        )
    ct2 = [c for key, c in contenders.items() if key.startswith("ct2_")]
    if ct2:
        lines.append(
            f"ctranslate2: models.Whisper.encode + generate(beam_size=1) on the same log-mel features, "
            f"intra_threads={ct2[0].extra['intra_threads']} (= torch.get_num_threads()), inter_threads=1"
        )
    if generate.texts != engine.texts:
        differing = sum(a != b for a, b in zip(generate.texts, engine.texts))
        lines.append(f"WARNING: engine and generate() texts differ on {differing} of {len(engine.texts)} segments")
    return "\n".join(lines)


# -- entry point ----------------------------------------------------------------------------------
def run_decode_bench(args) -> int:
    """``streamsed bench decode``: print a markdown table, optionally write JSON; exit status."""
    from ..core.errors import UserError
    from ..core.segments import segment_audio
    from ..engine.engine import Target
    from ..engine.loading import load_engine

    if args.repeat < 1:
        raise UserError("--repeat must be at least 1")
    audio, source = load_bench_audio(args.audio)
    engine = load_engine(args.model, device=args.device, dtype=args.dtype)
    if engine.family.name != "whisper":
        raise UserError(f"bench decode compares Whisper decoders; {args.model!r} is a {engine.family.name} model")
    target = Target("en", "en")
    engine.check_target(target)
    segments = segment_audio(engine, audio)
    if not segments:
        raise UserError(f"no speech found in {source}")
    audio_batches = _batches([s.audio for s in segments])
    audio_info = {
        "source": source,
        "seconds": round(len(audio) / engine.sample_rate, 2),
        "segments": len(segments),
        "segment_seconds": [round(len(s.audio) / engine.sample_rate, 2) for s in segments],
        "batches": [len(b) for b in audio_batches],
    }
    ct2_dir = ct2_model_dir(args.model)
    if ct2_dir is None:
        print(f"note: no CTranslate2 weights for {args.model!r}; ctranslate2 rows skipped", file=sys.stderr)

    load_before = load_average()
    contenders = run_contenders(engine, audio_batches, target, ct2_dir, args.repeat)
    info = {**machine_info(engine), "load_average_1min": [load_before, load_average()]}
    print(report(info, audio_info, args.repeat, contenders))
    if args.json_path:
        data = to_json(info, audio_info, args.repeat, contenders)
        Path(args.json_path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return 0


def load_bench_audio(path: str | None) -> tuple[np.ndarray, str]:
    """(16 kHz samples, description): the given file, else synthesized English speech."""
    from ..core.audio import load_audio_file
    from ..core.errors import UserError

    if path:
        return load_audio_file(path)[0], path
    try:
        return synthesize_speech(), f"synthesized English speech (espeak-ng, {len(SENTENCES)} sentences)"
    except RuntimeError as error:
        raise UserError(str(error)) from None
