// The speaker page: /speak?stream=ID[&source_lang=xx&targets=de,en&target_lang=en&batch_ms=50]
// Microphone -> AudioWorklet (mono Int16 batches of batch_ms, 20-100 ms, at the browser's own
// sample rate, declared in the start message) -> ws /v1/stream; shows the captions coming back.
import {
  withToken,
  CaptionView, STREAM_ID, Status, applyLookOptions, backoffMs, flag, intParam, socketUrl,
} from "/web/captions.js";

const params = new URLSearchParams(location.search);
applyLookOptions(params);
const $ = (id) => document.getElementById(id);
const status = new Status($("status"));
const view = new CaptionView($("captions"), { lines: intParam(params, "lines", 6, 1, 50) });
const batchMs = intParam(params, "batch_ms", 50, 20, 100);
const processing = params.has("processing") && flag(params.get("processing")); // browser AGC/NS/AEC
const MAX_BUFFERED_S = 5; // audio waiting in the socket beyond this is dropped, not queued forever

$("stream").value = params.get("stream") || `mic-${crypto.getRandomValues(new Uint32Array(1))[0].toString(16)}`;
$("source_lang").value = params.get("source_lang") || "";
$("targets").value = params.get("targets") || "";
showLinks();

let capture = null; // {media, context, node}
let ws = null;
let running = false;
let attempt = 0;
let retryTimer = null;
let flushed = null;
let droppedMs = 0;
let rate = 0; // the AudioContext's sample rate, declared in start
let hadSession = false; // a session was open since Start: errors on reconnect may be transient

$("setup").addEventListener("submit", (event) => { event.preventDefault(); start(); });
$("stop").addEventListener("click", () => stop());
$("stream").addEventListener("input", showLinks);

function options() {
  const stream = $("stream").value.trim();
  const source = $("source_lang").value.trim();
  const targets = $("targets").value.split(",").map((t) => t.trim()).filter(Boolean);
  return { stream, source, targets };
}

function showLinks() {
  const id = encodeURIComponent($("stream").value.trim());
  const link = (href, text) => Object.assign(document.createElement("a"),
    { href: withToken(href), textContent: text, target: "_blank" });
  $("links").replaceChildren(link(`/captions?stream=${id}`, "open the viewer"), " · export ",
    link(`/v1/streams/${id}/captions.vtt`, ".vtt"), " ", link(`/v1/streams/${id}/captions.srt`, ".srt"), " ",
    link(`/v1/streams/${id}/captions.jsonl`, ".jsonl"));
}

async function start() {
  const { stream, source, targets } = options();
  if (!STREAM_ID.test(stream)) {
    status.set("error", "stream id: 1-128 of A-Z a-z 0-9 . _ : -");
    return;
  }
  const query = new URLSearchParams(params);
  query.set("stream", stream);
  for (const [key, value] of [["source_lang", source], ["targets", targets.join(",")]]) {
    if (value) query.set(key, value); else query.delete(key);
  }
  history.replaceState(null, "", `?${query}`);
  if (!window.isSecureContext || !navigator.mediaDevices || !window.AudioWorkletNode) {
    status.set("error", "browsers allow the microphone only on https:// or http://localhost pages: " +
      "open this page through an https reverse proxy, or on the daemon's own machine");
    return;
  }
  setRunning(true);
  status.set("connecting", "asking for the microphone…");
  try {
    const media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: { ideal: 1 }, echoCancellation: processing, noiseSuppression: processing,
        autoGainControl: processing },
    });
    // No sampleRate option: the context runs at the device's rate, so the browser never resamples
    // (Firefox refuses a microphone in a context of another rate); the daemon resamples instead.
    const context = new AudioContext();
    await context.audioWorklet.addModule("/web/speak-worklet.js");
    const node = new AudioWorkletNode(context, "pcm-batcher", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { batchFrames: Math.round((context.sampleRate * batchMs) / 1000) },
    });
    const silent = context.createGain();
    silent.gain.value = 0; // pulled by the destination so it always runs, but never heard
    context.createMediaStreamSource(media).connect(node).connect(silent).connect(context.destination);
    node.port.onmessage = (message) => audio(message.data);
    await context.resume();
    capture = { media, context, node };
    rate = context.sampleRate;
    document.body.dataset.sampleRate = context.sampleRate;
  } catch (error) {
    setRunning(false);
    status.set("error", `microphone unavailable: ${error.message}`);
    return;
  }
  attempt = 0;
  hadSession = false;
  connect();
}

function connect() {
  retryTimer = null;
  const { stream, source, targets } = options();
  status.set("connecting", attempt ? "reconnecting…" : "connecting…");
  const socket = new WebSocket(socketUrl("/v1/stream"));
  socket.binaryType = "arraybuffer";
  ws = socket;
  let fatal = false;
  let problem = "server gone";
  socket.onopen = () => {
    if (!running) { socket.close(); return; } // stopped while connecting
    const start = { type: "start", stream, sample_rate: rate, encoding: "pcm_s16le" };
    if (source) start.source_lang = source;
    if (targets.length) start.targets = targets;
    socket.send(JSON.stringify(start));
  };
  socket.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch { return; }
    if (event.type === "ready") {
      attempt = 0;
      hadSession = true;
      view.newEpoch();
      view.target = params.get("target_lang") || event.targets[0];
      $("rate").textContent = `${event.sample_rate} Hz from this browser · ${event.model} · ` +
        `${event.source_lang || "language detected"} → ${event.targets.map((t) => t || "same").join(", ")} ·`;
      $("rate").dataset.sampleRate = event.sample_rate;
      status.set("live", `live · ${event.stream}`);
    } else if (event.type === "error") {
      // Wrong options stop the microphone. stream_in_use after a reconnect is the old connection
      // the daemon has not noticed is gone yet (its ping timeout ends it): keep retrying.
      const wrong = ["bad_option", "unsupported_encoding", "bad_sample_rate", "unsupported_language"];
      if (wrong.includes(event.code) || (event.code === "stream_in_use" && !hadSession)) fatal = true;
      problem = event.code;
      status.set("error", `${event.code}: ${event.message}`);
    } else {
      view.handle(event);
    }
  };
  socket.onclose = (event) => {
    if (ws === socket) ws = null;
    if (!running) {
      status.set("stopped", "stopped · microphone off");
      return;
    }
    if (fatal) {
      stop();
      return;
    }
    const delay = backoffMs(attempt++);
    status.set("gone", `${problem} · retrying in ${Math.ceil(delay / 1000)} s (audio meanwhile is not captioned)`);
    retryTimer = setTimeout(connect, delay);
  };
}

function audio({ pcm, rms, peak, flushed: last }) {
  const db = rms > 0 ? 20 * Math.log10(rms) : -Infinity;
  const meter = $("meter");
  meter.dataset.level = Number.isFinite(db) ? db.toFixed(1) : "-inf";
  if (Number.isFinite(db) && !(db <= Number(meter.dataset.max))) meter.dataset.max = db.toFixed(1); // loudest so far
  meter.dataset.peak = peak.toFixed(3);
  meter.setAttribute("aria-valuenow", Number.isFinite(db) ? db.toFixed(0) : "-60");
  meter.style.setProperty("--level", Math.max(0, Math.min(1, (db + 60) / 60)).toFixed(3));
  meter.classList.toggle("clipping", peak >= 0.99);
  $("level").textContent = Number.isFinite(db) ? `${db.toFixed(0)} dB` : "silent";
  if (pcm.byteLength && ws && ws.readyState === WebSocket.OPEN) {
    if (ws.bufferedAmount > MAX_BUFFERED_S * rate * 2) {
      droppedMs += (pcm.byteLength / 2 / rate) * 1000; // the network cannot keep up
      document.body.dataset.droppedMs = Math.round(droppedMs);
    } else {
      ws.send(pcm);
    }
  }
  if (last && flushed) flushed();
}

async function stop() {
  if (!running) return;
  running = false;
  clearTimeout(retryTimer);
  retryTimer = null;
  if (capture) {
    const { media, context, node } = capture;
    capture = null;
    await new Promise((resolve) => { // the last partial batch goes out before "stop"
      flushed = resolve;
      node.port.postMessage("flush");
      setTimeout(resolve, 500);
    });
    flushed = null;
    media.getTracks().forEach((track) => track.stop());
    context.close();
  }
  if (ws && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({ type: "stop" })); // the daemon sends the last finals, then closes
    status.set("stopping", "finishing the last captions…");
  } else if (status.state !== "error") {
    status.set("stopped", "stopped · microphone off");
  }
  setRunning(false);
}

function setRunning(on) {
  running = on;
  $("start").disabled = on;
  $("stop").disabled = !on;
  for (const id of ["stream", "source_lang", "targets"]) $(id).disabled = on;
}
