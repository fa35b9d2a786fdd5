"""Command line: ``streamsed translate`` (offline files), ``bench``, ``serve``, ``convert-flax``, ``finetune``...

Every expected failure (bad audio, unknown language, model not available) ends with a one-line
``streamsed: error: ...`` on stderr and exit status 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..core.captions import FORMATS
from ..core.errors import UserError

log = logging.getLogger("streamsed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamsed", description="Streaming speech translation.")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning (default) or error")
    commands = parser.add_subparsers(dest="command", required=True)

    translate = commands.add_parser("translate", help="translate or transcribe an audio file")
    translate.add_argument("audio", help="mono audio file (WAV, FLAC, OGG...; any sample rate)")
    add_model_options(translate)
    translate.add_argument("--source-lang", default=None, help="spoken language, e.g. de (default: detected per segment by Whisper)")
    translate.add_argument(
        "--target-lang", default=None,
        help="output language(s), comma-separated, e.g. en or de,en (default: same as source = transcribe)",
    )
    translate.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    translate.add_argument("--prompt", default=None, help="previous-text context for Whisper (names, spelling, style)")
    translate.add_argument("--hotwords", default=None, help="words to favour, put before --prompt (Whisper)")
    translate.add_argument(
        "--window", choices=["exact", "fast", "auto"], default="auto",
        help="encoder window (default: auto = fast on CPU, exact on CUDA, as the daemon's [model] final_window)",
    )
    translate.add_argument("--window-margin", type=float, default=5.0,
                           help="seconds kept after the audio in the fast window (default 5, as [model] window_margin_s)")

    bench = commands.add_parser("bench", help="benchmarks (see bench/README.md)")
    bench.add_argument("suite", choices=["decode", "window", "load", "soak"],
                       help="decode: engine vs generate() vs faster-whisper; window: WER and encoder time, exact vs "
                            "fast; load: N real-time streams against the daemon; soak: RSS and lag over a long run")
    add_model_options(bench)
    bench.add_argument("--audio", default=None, help="audio file (default: synthesized English speech)")
    bench.add_argument("--repeat", type=int, default=3, help="timed runs per contender (best is reported)")
    bench.add_argument("--json", dest="json_path", default=None, help="also write results as JSON here")
    bench.add_argument("--streams", default=None,
                       help="load: concurrent stream counts (default 1,2,4,8); soak: streams (default 2)")
    bench.add_argument("--minutes", type=float, default=30.0, help="soak: how long (default 30)")
    bench.add_argument("--listeners", type=int, default=2, help="soak: caption listeners per stream (default 2)")
    bench.add_argument("--duration", type=float, default=None,
                       help="load: seconds each stream talks (the file repeats; default: the file once)")
    bench.add_argument("--url", default=None, help="load: a running daemon (default: start one)")
    bench.add_argument("--config", default=None, help="load: settings file for the daemon it starts")
    bench.add_argument("--plot", default=None, help="load, soak: write a PNG plot here")
    bench.add_argument("--margins", default="0,1,2,3,5,8", help="window: fast-window margins in seconds")

    serve = commands.add_parser("serve", help="run the streaming daemon (websockets; see docs/protocol.md)")
    serve.add_argument(
        "--config", default=None, help="TOML settings file, e.g. config/streamsed.toml (default: built-in defaults)"
    )
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="websockets and HTTP port (default 8765; 0 = any free)")
    serve.add_argument("--model", default=None, help="model reference (default: whisper-base)")
    serve.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "int8"])
    serve.add_argument(
        "--log-level", dest="serve_log_level", default=None, help="debug, info (default), warning or error"
    )

    convert_flax = commands.add_parser("convert-flax", help="convert a Flax checkpoint (flax_model.msgpack) to torch")
    convert_flax.add_argument("directory", help="Flax checkpoint directory (config.json + flax_model.msgpack)")
    convert_flax.add_argument("out", help="directory for the torch checkpoint (loads with --model OUT)")

    finetune = commands.add_parser("finetune", help="fine-tune a model on a JSONL manifest of audio and text")
    add_model_options(finetune)
    finetune.add_argument("--data", required=True,
                          help='JSONL: {"audio": path relative to the file, "text", "language", "task"} a line')
    finetune.add_argument("--output", required=True, help="directory for the fine-tuned checkpoint")
    finetune.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    finetune.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    finetune.add_argument("--batch-size", type=int, default=8, help="clips per step (default 8)")
    finetune.add_argument("--eval", dest="eval_data", default=None, help="JSONL manifest: WER before and after")
    finetune.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")

    commands.add_parser("devices", help="list the microphones (audio input devices) PortAudio sees")
    mic = commands.add_parser(
        "mic", help="live captions of this computer's microphone in the terminal (--local or --server URL)"
    )
    from .mic import add_arguments as add_mic_arguments

    add_mic_arguments(mic)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from ..engine.loading import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model reference (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "int8"])


def run_translate(args) -> int:
    from ..core.audio import load_audio_file
    from ..core.captions import format_results
    from ..core.languages import context_text, parse_language, resolve_targets
    from ..core.segments import segment_audio
    from ..engine.loading import load_engine
    from ..engine.offline import translate_segments

    source = parse_language(args.source_lang, "source")
    targets = [parse_language(t, "target") for t in (args.target_lang or "").split(",") if t.strip()]
    if args.format in ("srt", "vtt") and len(targets) > 1:
        raise UserError(f"--format {args.format} takes one target language; use jsonl for several")
    audio, _ = load_audio_file(args.audio)  # check the input before the (slow) model load
    engine = load_engine(args.model, device=args.device, dtype=args.dtype, window_margin_s=args.window_margin)
    try:
        prompt = context_text(args.prompt, args.hotwords)
    except ValueError as error:
        raise UserError(str(error)) from None
    resolved = resolve_targets(engine, source, targets, prompt)
    segments = segment_audio(engine, audio)
    if not segments:
        log.warning("no speech found in %s", args.audio)
    results = list(translate_segments(engine, segments, resolved, window=args.window))
    sys.stdout.write(format_results(results, args.format))
    return 0


def run_serve(args) -> int:
    import asyncio

    from ..daemon.config import ConfigError, load_config
    from ..daemon.server import Daemon

    overrides = {
        "server.host": args.host, "server.port": args.port, "model.name": args.model,
        "model.device": args.device, "model.dtype": args.dtype, "logging.level": args.serve_log_level,
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as error:
        raise UserError(str(error)) from None
    level = config.logging.level.upper()
    logging.getLogger().setLevel(level)
    # websockets logs every HTTP probe and connection at INFO; keep that for debug.
    logging.getLogger("websockets").setLevel(level if level == "DEBUG" else "WARNING")
    try:
        daemon = Daemon(config)
    except ConfigError as error:  # an unreadable auth_tokens_file
        raise UserError(str(error)) from None
    if config.mqtt.enabled:  # a sink: registered before source edges, so it is stopped after them
        from ..daemon.mqtt import MqttEdge

        try:
            daemon.add_edge(MqttEdge(config.mqtt))
        except ConfigError as error:  # an unreadable password_file or TLS file
            raise UserError(str(error)) from None
    if config.microphone.enabled:  # a source: registered after the sinks, so its last finals reach them
        from ..daemon.microphone import MicrophoneEdge

        daemon.add_edge(MicrophoneEdge(config))
    try:
        asyncio.run(daemon.run())
    except ConfigError as error:  # unreadable TLS files
        raise UserError(str(error)) from None
    except OSError as error:  # e.g. the port is taken
        where = f"{config.server.host}:{config.server.port}"
        raise UserError(f"cannot serve on {where}: {error.strerror or error}") from None
    return 0


def run_bench(args) -> int:
    if args.suite == "soak":
        from ..bench.soak import run_soak_bench

        return run_soak_bench(args)
    if args.suite == "load":
        from ..bench.load import run_load_bench

        return run_load_bench(args)
    if args.suite == "window":
        from ..bench.window import format_report, run_window_bench

        device = args.device if args.device != "auto" else "cpu"
        dtype = "int8" if args.dtype == "int8" else "float32"
        try:
            margins = [float(m) for m in args.margins.split(",")]
        except ValueError:
            raise UserError(f"--margins takes seconds separated by commas, e.g. 2,5; got {args.margins!r}") from None
        print(format_report(run_window_bench(args.model, device, margins, json_path=args.json_path, dtype=dtype)))
        return 0
    from ..bench.decode import run_decode_bench

    return run_decode_bench(args)


def run_convert_flax(args) -> int:
    from ..engine.flax_convert import FlaxFormatError, convert_flax_checkpoint

    try:
        print(convert_flax_checkpoint(args.directory, args.out))
    except (FlaxFormatError, FileExistsError) as error:
        raise UserError(str(error)) from None
    return 0


def run_finetune(args) -> int:
    from ..engine.finetune import FinetuneOptions, finetune

    options = FinetuneOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                              freeze_encoder=args.freeze_encoder)
    report = finetune(args.model, args.data, args.output, options, eval_manifest=args.eval_data, device=args.device)
    print(report.summary())
    return 0


def run_devices(args) -> int:
    from ..daemon.microphone import MicrophoneError, format_devices, input_devices

    try:
        sys.stdout.write(format_devices(input_devices()))
    except MicrophoneError as error:
        raise UserError(str(error)) from None
    return 0


def run_mic(args) -> int:
    from .mic import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.log_level.lower() != "debug":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # transformers' advice-level warnings are not for end users
        hf_logging.disable_progress_bar()  # weight-loading bars on every start; ours shows the one-time conversion
    from ..core.audio import AudioError
    from ..core.languages import UnsupportedTarget
    from ..engine.loading import ModelUnavailable

    try:
        commands = {"translate": run_translate, "bench": run_bench, "serve": run_serve, "devices": run_devices,
                    "mic": run_mic, "convert-flax": run_convert_flax, "finetune": run_finetune}
        return commands[args.command](args)
    except (UserError, AudioError, UnsupportedTarget, ModelUnavailable) as error:
        print(f"streamsed: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
