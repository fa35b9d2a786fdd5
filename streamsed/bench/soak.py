"""``streamsed bench soak --minutes N``: the real daemon under steady load for a long time.

It starts the daemon (with MQTT publishing to a Mosquitto it starts on a free port, when the
``mosquitto`` binary is installed), then for ``--minutes`` keeps ``--streams`` real-time websocket
streams of a speech file talking (the file loops; each stream reconnects after every pass, so sessions
come and go), ``--listeners`` caption listeners per stream and an MQTT subscriber. Every
``SAMPLE_S`` seconds it records the daemon's RSS and the final lag of the finals of the last window.
Output: a table of the samples, JSON (``--json``) and a plot of RSS and lag over time (``--plot``).

Memory is judged on the second half of the run (after warm-up: model, caches, allocator pools):
``rss_growth`` is its last sample over its first, minus one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .load import StreamLog, daemon_process, free_port, percentile, rss_mb, run_stream

SAMPLE_S = 10.0


@contextlib.contextmanager
def mosquitto_broker():
    """(port) of a throwaway Mosquitto on loopback, or None when it is not installed."""
    if shutil.which("mosquitto") is None:
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        conf = Path(folder) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=10)


async def listen(ws_url: str, stream: str, counts: dict, stop: asyncio.Event) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    while not stop.is_set():
        with contextlib.suppress(ConnectionClosed, OSError):
            async with connect(f"{ws_url}/v1/captions?stream={stream}") as ws:
                while not stop.is_set():
                    try:
                        await asyncio.wait_for(ws.recv(), 1.0)
                        counts["listener_events"] += 1
                    except TimeoutError:
                        continue
        await asyncio.sleep(0.5)


async def subscribe_mqtt(port: int, counts: dict, stop: asyncio.Event) -> None:
    import aiomqtt

    with contextlib.suppress(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port) as client:
            await client.subscribe("streamsed/#")
            async for _ in client.messages:
                counts["mqtt_messages"] += 1
                if stop.is_set():
                    return


async def talk(ws_url: str, stream: str, pcm: np.ndarray, rate: int, delay: float, until: float,
               logs: list[StreamLog]) -> None:
    """One stream, one pass of the file per session, reconnecting until ``until``."""
    await asyncio.sleep(delay)
    while time.monotonic() + len(pcm) / rate < until:
        log = StreamLog()
        logs.append(log)
        await run_stream(ws_url, stream, pcm, rate, 0.0, len(pcm) / rate, log)
        if log.refused:
            await asyncio.sleep(1.0)


async def soak(ws_url: str, http_url: str, pid: int | None, pcm: np.ndarray, rate: int, minutes: float,
               streams: int, listeners: int, mqtt_port: int | None) -> dict:
    stop = asyncio.Event()
    counts = {"listener_events": 0, "mqtt_messages": 0}
    started = time.monotonic()
    until = started + minutes * 60
    logs: list[StreamLog] = []
    side = [asyncio.create_task(listen(ws_url, f"soak-{i}", counts, stop))
            for i in range(streams) for _ in range(listeners)]
    if mqtt_port is not None:
        side.append(asyncio.create_task(subscribe_mqtt(mqtt_port, counts, stop)))
    talkers = [asyncio.create_task(talk(ws_url, f"soak-{i}", pcm, rate, i * 0.37, until, logs)) for i in range(streams)]
    samples, seen = [], 0
    while any(not t.done() for t in talkers):
        await asyncio.sleep(SAMPLE_S)
        lags = []
        for log in logs:
            for arrived, event in log.finals:
                if arrived > time.monotonic() - SAMPLE_S:
                    lags.append(arrived - (log.started + event["end"]))
        finals = sum(len(log.finals) for log in logs)
        samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": rss_mb(pid),
                        "lag_p50": percentile(lags, 50), "lag_p95": percentile(lags, 95),
                        "finals": finals - seen, **counts})
        seen = finals
        print(f"{samples[-1]['t']:7.0f} s  RSS {samples[-1]['rss_mb']} MB  lag p50 {samples[-1]['lag_p50']} s  "
              f"p95 {samples[-1]['lag_p95']} s", file=sys.stderr)
    stop.set()
    await asyncio.gather(*talkers, return_exceptions=True)
    for task in side:
        task.cancel()
    await asyncio.gather(*side, return_exceptions=True)
    half = [s["rss_mb"] for s in samples[len(samples) // 2:] if s["rss_mb"] is not None]
    return {"minutes": minutes, "streams": streams, "listeners_per_stream": listeners, "mqtt": mqtt_port is not None,
            "sessions": len(logs), "finals": sum(len(log.finals) for log in logs), **counts,
            "rss_growth": round(half[-1] / half[0] - 1, 4) if len(half) >= 2 else None, "samples": samples}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [s["rss_mb"] for s in samples], marker=".")
    top.set(ylabel="daemon RSS (MB)", title=f"soak: {report['streams']} real-time streams, "
            f"{report['listeners_per_stream']} listeners each{', MQTT' if report['mqtt'] else ''}")
    bottom.plot(t, [s["lag_p50"] if s["lag_p50"] is not None else np.nan for s in samples], marker=".", label="p50")
    bottom.plot(t, [s["lag_p95"] if s["lag_p95"] is not None else np.nan for s in samples], marker=".", label="p95")
    bottom.set(xlabel="minutes", ylabel="final lag (s)")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_soak_bench(args) -> int:
    from ..core.errors import UserError
    from .decode import load_bench_audio

    if args.minutes <= 0:
        raise UserError("--minutes must be positive")
    audio, _ = load_bench_audio(args.audio)
    rate = 16000
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    try:
        streams = int(args.streams or 2)
    except ValueError:
        raise UserError(f"--streams takes one count for soak, e.g. 2; got {args.streams!r}") from None
    if streams < 1 or args.listeners < 0:
        raise UserError("soak needs --streams of at least 1 and --listeners of 0 or more")
    with contextlib.ExitStack() as stack:
        mqtt_port = stack.enter_context(mosquitto_broker())
        config = args.config
        if config is None and mqtt_port is not None:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            config = str(Path(folder) / "soak.toml")
            Path(config).write_text(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {mqtt_port}\n')
        http_url, pid = stack.enter_context(daemon_process(args.model, config))
        ws_url = http_url.replace("http://", "ws://")
        report = asyncio.run(soak(ws_url, http_url, pid, pcm, rate, args.minutes, streams, args.listeners, mqtt_port))
    report.update(date=time.strftime("%Y-%m-%d"), model=args.model)
    print(f"{report['sessions']} sessions, {report['finals']} finals, {report['listener_events']} listener events, "
          f"{report['mqtt_messages']} MQTT messages; RSS growth over the second half: {report['rss_growth']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0
