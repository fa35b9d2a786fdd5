// The live-caption viewer: /captions?stream=ID[&target_lang=xx] (and / with a stream picker).
// Subscribes to ws /v1/captions, shows the last lines, reconnects by itself with backoff.
import {
  withToken,
  CaptionView, STREAM_ID, Status, applyLookOptions, backoffMs, intParam, socketUrl,
} from "/web/captions.js";

const params = new URLSearchParams(location.search);
applyLookOptions(params);
const status = new Status(document.getElementById("status"));
const stream = params.get("stream");

if (stream === null) {
  showPicker();
} else if (!STREAM_ID.test(stream)) {
  status.set("error", `bad stream id ${JSON.stringify(stream)}: use 1-128 of A-Z a-z 0-9 . _ : -`);
} else {
  watch(stream, params.get("target_lang") || null);
}

function watch(stream, target) {
  document.title = `${stream} · live captions`;
  const view = new CaptionView(document.getElementById("captions"), {
    lines: intParam(params, "lines", 3, 1, 50), target,
  });
  const idleMs = intParam(params, "idle", 10, 2, 3600) * 1000;
  const url = socketUrl("/v1/captions", { stream, target_lang: target });
  let ws = null;
  let subscribed = false;
  let attempt = 0;
  let retryAt = 0;
  let retryTimer = null;
  let lastEvent = 0; // time of the last caption shown, 0 = none on this connection
  let lastProbe = 0;
  let fatal = false;

  function connect() {
    retryTimer = null;
    status.set("connecting", attempt ? "reconnecting…" : "connecting…");
    const socket = new WebSocket(url);
    ws = socket;
    socket.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch { return; }
      if (event.type === "subscribed") {
        subscribed = true;
        attempt = 0;
        lastEvent = 0;
        view.newEpoch(); // a restarted daemon numbers segments from 0 again
        tick();
      } else if (event.type === "error") {
        fatal = true;
        status.set("error", event.message);
      } else if (view.handle(event)) {
        lastEvent = Date.now();
        status.set("live", `live · ${stream}`);
      }
    };
    socket.onclose = (event) => {
      if (ws !== socket) return; // given up on by the health probe already
      lost(fatal || event.code === 1008);
    };
  }

  function lost(permanent) {
    ws = null;
    subscribed = false;
    if (permanent) return; // e.g. a language the model cannot produce: the error stays on screen
    const delay = backoffMs(attempt++);
    retryAt = Date.now() + delay;
    retryTimer = setTimeout(connect, delay);
    tick();
  }

  // A server that vanished without closing the connection (network loss) is only noticed by
  // probing /healthz while the stream is quiet.
  async function probe() {
    lastProbe = Date.now();
    const socket = ws;
    try {
      const reply = await fetch("/healthz", { cache: "no-store", signal: AbortSignal.timeout(5000) });
      if (reply.ok) return;
    } catch { /* unreachable */ }
    if (ws === socket && socket) {
      socket.onclose = null;
      socket.close();
      lost(false);
    }
  }

  function tick() {
    const now = Date.now();
    if (retryTimer) {
      const seconds = Math.max(1, Math.ceil((retryAt - now) / 1000));
      status.set("gone", `server gone · retrying in ${seconds} s`);
      return;
    }
    if (!subscribed) return;
    if (!lastEvent) {
      status.set("idle", `idle · waiting for captions on ${stream}`);
    } else if (now - lastEvent >= idleMs) {
      status.set("idle", `idle · no captions for ${ago(now - lastEvent)}`);
    }
    if (status.state === "idle" && now - lastProbe > 15000) probe();
  }

  setInterval(tick, 1000);
  connect();
}

function ago(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h`;
}

async function showPicker() {
  document.body.classList.add("picking");
  document.getElementById("captions").hidden = true;
  document.getElementById("picker").hidden = false;
  status.set("idle", "pick a stream");
  const list = document.getElementById("streams");
  const link = (href, text) => Object.assign(document.createElement("a"), { href: withToken(href), textContent: text });
  async function refresh() {
    let streams;
    try {
      const reply = await fetch(withToken("/v1/streams"), { cache: "no-store" });
      streams = (await reply.json()).streams;
      status.set("live", `connected to ${location.host}`);
    } catch {
      status.set("gone", "server gone · retrying");
      return;
    }
    const items = streams.map((s) => {
      const item = document.createElement("li");
      const id = encodeURIComponent(s.stream);
      item.append(link(`/captions?stream=${id}`, s.stream),
        ` ${s.live ? "● live" : "ended"} · ${s.finals} captions`,
        s.targets.length ? ` (${s.targets.join(", ")})` : "", " · export ",
        link(`/v1/streams/${id}/captions.vtt`, ".vtt"), " ",
        link(`/v1/streams/${id}/captions.srt`, ".srt"), " ",
        link(`/v1/streams/${id}/captions.jsonl`, ".jsonl"));
      return item;
    });
    if (!items.length) items.push(Object.assign(document.createElement("li"), { textContent: "none yet" }));
    list.replaceChildren(...items);
  }
  refresh();
  setInterval(refresh, 5000);
}
