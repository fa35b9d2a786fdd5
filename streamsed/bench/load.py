"""``streamsed bench load``: N concurrent real-time streams against the real daemon.

For each N of ``--streams`` (e.g. 1,2,4,8) N websocket clients stream the same speech at real-time
pace (100 ms chunks, starts staggered by ``STAGGER_S``) for ``--duration`` seconds, as protocol v1
clients do. Every event is timestamped on arrival. Lags are measured from the moment the speech
happened in real time, which is what a viewer waits:

- final lag = arrival of a segment's final - (stream start + the segment's ``end``);
- first partial = arrival of the segment's first partial - (stream start + its ``start``);
- partial share = segments that showed a partial before their final.

Before the streams, the same process measures U = one plain ``model.generate()`` of the file's
median VAD segment (best of 3), and every lag is also given in units of U. The daemon is started as a
subprocess (its RSS is read from /proc) unless ``--url`` points at a running one; engine busy % and
the VAD cost (CPU ms Silero took per second of each stream's audio) come from its ``GET /v1/engine``
counters. Output: a table, JSON (``--json``) and a plot of lag vs N (``--plot``, matplotlib).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CHUNK_S = 0.1
STAGGER_S = 0.37  # stream i starts i * STAGGER_S after stream 0: real talkers do not start in sync
WORKER_COUNTERS = ("batches", "requests", "superseded", "preempted", "deferred", "decoder_forwards", "busy_seconds")


@dataclass
class StreamLog:
    started: float = 0.0  # wall time of the first audio chunk
    refused: str | None = None  # error code when the daemon refused the stream
    shed: bool = False  # the daemon closed it under load (1013 overloaded) after admitting it
    finals: list[tuple[float, dict]] = field(default_factory=list)
    partials: list[tuple[float, dict]] = field(default_factory=list)


@dataclass
class LoadResult:
    streams: int
    refused: int
    segments: int
    final_lag_p50: float | None
    final_lag_p95: float | None
    final_lag_max: float | None
    first_partial_p50: float | None
    partial_share: float | None
    finals_per_s: float
    engine_busy: float | None
    rss_mb: float | None
    lag_over_time: list[tuple[float, float]]  # (seconds into the run, final lag)
    shed: int = 0  # streams the daemon closed with overloaded while they ran (load shedding)
    draft_accepted_share: float | None = None
    vad_ms_per_stream_second: float | None = None  # CPU ms Silero VAD took per second of each stream
    # Where a final's lag goes (from its own queued_ms/compute_ms) and what happened to partial work:
    final_queued_ms_p50: float | None = None
    final_queued_ms_p95: float | None = None
    final_compute_ms_p50: float | None = None
    final_compute_ms_p95: float | None = None
    partials_received: int = 0
    worker: dict = field(default_factory=dict)  # deltas of the worker counters over the level


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


# -- the unit U ---------------------------------------------------------------------------------------
def measure_u(model: str, audio: np.ndarray) -> tuple[float, float]:
    """(seconds of one plain generate() of the median VAD segment, that segment's length)."""
    import gc

    import torch

    from ..core.segments import segment_audio
    from ..engine.loading import load_engine

    engine = load_engine(model, device="cpu")
    segments = segment_audio(engine, audio)
    median = sorted(segments, key=lambda s: len(s.audio))[len(segments) // 2]
    inputs = engine.feature_inputs([median.audio])
    features = inputs[engine.feature_extractor.model_input_names[0]]
    kwargs = {"num_beams": 1, "do_sample": False}
    if engine.family.name == "whisper" and engine.family.multilingual:
        kwargs.update(language="en", task="transcribe")
    best = float("inf")
    with torch.inference_mode():
        for _ in range(4):  # one warm-up, best of three
            started = time.perf_counter()
            engine.model.generate(features, **kwargs)
            best = min(best, time.perf_counter() - started)
    seconds = len(median.audio) / engine.sample_rate
    del engine
    gc.collect()
    return best, seconds


# -- the daemon -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def daemon_process(model: str, config: str | None):
    port = free_port()
    command = [sys.executable, "-m", "streamsed", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model", model, "--log-level", "warning"]
    if config:
        command += ["--config", config]
    env = {**os.environ, "STREAMSED_SERVER__MAX_SESSIONS": "64"}
    # The daemon's log goes to a file, not a pipe: nobody reads a pipe during the run, and a full one
    # would block the daemon mid-benchmark.
    log_file = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"the daemon exited: {log_file.read()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            time.sleep(0.5)
        else:
            raise RuntimeError("the daemon did not become ready within 600 s")
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
        log_file.close()


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


# -- one client ---------------------------------------------------------------------------------------
async def run_stream(ws_url: str, stream: str, pcm: np.ndarray, rate: int, delay: float, duration: float,
                     log: StreamLog) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    await asyncio.sleep(delay)
    chunk = int(rate * CHUNK_S)
    async with connect(f"{ws_url}/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "stream": stream, "sample_rate": rate, "encoding": "pcm_s16le",
                                  "source_lang": "en"}))
        first = json.loads(await ws.recv())
        if first.get("type") != "ready":
            log.refused = first.get("code", "refused")
            return

        async def receive() -> None:
            try:
                async for message in ws:
                    event, now = json.loads(message), time.monotonic()
                    if event.get("type") == "final":
                        log.finals.append((now, event))
                    elif event.get("type") == "partial":
                        log.partials.append((now, event))
            except ConnectionClosed as closed:
                log.shed = log.shed or (closed.rcvd is not None and closed.rcvd.code == 1013)

        receiver = asyncio.create_task(receive())
        log.started = time.monotonic()
        total = int(duration * rate)
        sent = 0
        try:
            while sent < total:  # the file again and again, at real-time pace
                offset = sent % len(pcm)
                piece = pcm[offset : offset + min(chunk, total - sent)]
                await ws.send(piece.tobytes())
                sent += len(piece)
                await asyncio.sleep(max(0.0, log.started + sent / rate - time.monotonic()))
            await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed as closed:  # shed by the daemon under load: what it delivered still counts
            if closed.rcvd is None or closed.rcvd.code != 1013:
                raise
            log.shed = True
        await receiver


async def run_level(ws_url: str, http_url: str, n: int, pcm: np.ndarray, rate: int, duration: float,
                    pid: int | None) -> LoadResult:
    before = http_json(http_url + "/v1/engine")
    logs = [StreamLog() for _ in range(n)]
    started = time.monotonic()
    await asyncio.gather(*(run_stream(ws_url, f"load-{n}-{i}", pcm, rate, i * STAGGER_S, duration, logs[i])
                           for i in range(n)))
    wall = time.monotonic() - started
    after = http_json(http_url + "/v1/engine")
    lags, firsts, over_time, with_partial, segments = [], [], [], 0, 0
    for log in logs:
        if log.refused:
            continue
        first_partial: dict[int, float] = {}
        for arrived, event in log.partials:
            first_partial.setdefault(event["segment"], arrived)
        for arrived, event in log.finals:
            segments += 1
            lag = arrived - (log.started + event["end"])
            lags.append(lag)
            over_time.append((round(arrived - started, 2), round(lag, 3)))
            seen = first_partial.get(event["segment"])
            if seen is not None and seen < arrived:
                with_partial += 1
                firsts.append(seen - (log.started + event["start"]))
    busy = (after["busy_seconds"] - before["busy_seconds"]) / wall / after.get("lanes", 1)
    vad_audio = after["vad"]["audio_seconds"] - before["vad"]["audio_seconds"]
    vad_ms = 1000 * (after["vad"]["cpu_seconds"] - before["vad"]["cpu_seconds"]) / vad_audio if vad_audio else None
    offered = after["draft_offered"] - before["draft_offered"]
    finals = [event for log in logs if not log.refused for _, event in log.finals]
    queued = [event["queued_ms"] for event in finals if event.get("queued_ms") is not None]
    computed = [event["compute_ms"] for event in finals if event.get("compute_ms") is not None]
    worker = {key: after[key] - before[key] for key in WORKER_COUNTERS if key in after and key in before}
    accepted = after["draft_accepted"] - before["draft_accepted"]
    return LoadResult(
        streams=n, refused=sum(bool(log.refused) for log in logs), shed=sum(log.shed for log in logs),
        segments=segments,
        final_lag_p50=percentile(lags, 50), final_lag_p95=percentile(lags, 95),
        final_lag_max=round(max(lags), 3) if lags else None, first_partial_p50=percentile(firsts, 50),
        partial_share=round(with_partial / segments, 3) if segments else None,
        finals_per_s=round(segments / wall, 3), engine_busy=round(min(busy, 1.0), 3), rss_mb=rss_mb(pid),
        lag_over_time=sorted(over_time), draft_accepted_share=round(accepted / offered, 3) if offered else None,
        vad_ms_per_stream_second=round(vad_ms, 2) if vad_ms is not None else None,
        final_queued_ms_p50=percentile(queued, 50), final_queued_ms_p95=percentile(queued, 95),
        final_compute_ms_p50=percentile(computed, 50), final_compute_ms_p95=percentile(computed, 95),
        partials_received=sum(len(log.partials) for log in logs), worker=worker,
    )


# -- report ---------------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    u = report["u_seconds"]

    def cell(value):
        return "-" if value is None else f"{value:.2f} s ({value / u:.2f} U)"

    lines = [f"U = {u:.3f} s (one generate() of a {report['u_segment_seconds']:.1f} s segment); "
             f"{report['duration_s']:.0f} s of speech per stream; {report['date']}",
             "| streams | refused | shed | segments | final lag p50 | p95 | max | first partial p50 | partial before final "
             "| finals/s | engine busy | VAD per stream | RSS |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in report["levels"]:
        share = "-" if r["partial_share"] is None else f"{100 * r['partial_share']:.0f}%"
        busy = "-" if r["engine_busy"] is None else f"{100 * r['engine_busy']:.0f}%"
        rss = "-" if r["rss_mb"] is None else f"{r['rss_mb']:.0f} MB"
        vad = r.get("vad_ms_per_stream_second")
        vad = "-" if vad is None else f"{vad:.1f} ms/s"
        lines.append(f"| {r['streams']} | {r['refused']} | {r.get('shed', 0)} | {r['segments']} | {cell(r['final_lag_p50'])} | "
                     f"{cell(r['final_lag_p95'])} | {cell(r['final_lag_max'])} | {cell(r['first_partial_p50'])} | "
                     f"{share} | {r['finals_per_s']:.2f} | {busy} | {vad} | {rss} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = report["u_seconds"]
    levels = report["levels"]
    n = [r["streams"] for r in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("final_lag_p50", "final lag p50"), ("final_lag_p95", "final lag p95"),
                       ("first_partial_p50", "first partial p50")):
        left.plot(n, [r[key] if r[key] is not None else np.nan for r in levels], marker="o", label=label)
    left.axhline(0.5 + 0.5 * u, color="grey", linestyle=":", label="0.5 s + 0.5 U")
    left.axhline(0.5 + 1.0 * u, color="grey", linestyle="--", label="0.5 s + 1 U")
    left.set_xscale("log", base=2)
    left.minorticks_off()
    left.set(xlabel="concurrent real-time streams", ylabel="seconds after the speech", xticks=n,
             title=f"lag vs streams (U = {u:.2f} s)")
    left.set_xticklabels([str(x) for x in n])
    left.legend(fontsize=8)
    for r in levels:
        if r["lag_over_time"]:
            t, lag = zip(*r["lag_over_time"])
            right.plot(t, lag, marker=".", linestyle="-", linewidth=0.8, label=f"{r['streams']} stream{'s' if r['streams'] > 1 else ''}")
    right.set(xlabel="seconds into the run", ylabel="final lag (s)", title="final lag over time")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_load_bench(args) -> int:
    from ..core.errors import UserError
    from .decode import load_bench_audio

    try:
        levels = [int(n) for n in (args.streams or "1,2,4,8").split(",")]
    except ValueError:
        raise UserError(f"--streams takes a comma-separated list of counts, e.g. 1,2,4,8; got {args.streams!r}") from None
    if not levels or min(levels) < 1:
        raise UserError("--streams counts must be at least 1")
    audio, source = load_bench_audio(args.audio)
    rate = 16000
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    duration = args.duration or len(pcm) / rate
    u, u_segment = measure_u(args.model, audio)
    print(f"U = {u:.3f} s (generate() of a {u_segment:.1f} s segment)", file=sys.stderr)
    report = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "audio": source, "u_seconds": round(u, 3),
              "u_segment_seconds": round(u_segment, 2), "duration_s": round(duration, 1),
              "cpu_count": os.cpu_count(), "levels": []}
    with contextlib.ExitStack() as stack:
        if args.url:
            http_url, pid = args.url.replace("ws://", "http://").replace("wss://", "https://").rstrip("/"), None
        else:
            http_url, pid = stack.enter_context(daemon_process(args.model, args.config))
        ws_url = http_url.replace("http://", "ws://").replace("https://", "wss://")
        for n in levels:
            result = asyncio.run(run_level(ws_url, http_url, n, pcm, rate, duration, pid))
            report["levels"].append(asdict(result))
            print(f"{n} streams: final lag p50 {result.final_lag_p50} s, p95 {result.final_lag_p95} s, "
                  f"partial share {result.partial_share}, busy {result.engine_busy}", file=sys.stderr)
        report["engine"] = http_json(http_url + "/v1/engine")
    print(format_table(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0
