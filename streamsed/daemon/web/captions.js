// Shared by the viewer (/captions) and the speaker page (/speak): caption lines, query options,
// status display and reconnect backoff. Plain ES module, no dependencies, no build step.

// Scripts written without spaces between words (as streamsed/stabilize.py): no space at the seam.
const CJK = /[\u2e80-\u2fff\u3000-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]/;

export function joinText(left, right) {
  if (!left || !right) return left || right || "";
  if (CJK.test(left.at(-1)) || CJK.test(right[0])) return left + right;
  return `${left} ${right}`;
}

// The daemon's access token, when this page was opened with ?token=...: browsers cannot set headers
// on websockets, so every socket, request and link of the page carries it on (docs/protocol.md).
const TOKEN = new URLSearchParams(location.search).get("token");

export function withToken(path) {
  if (!TOKEN) return path;
  const url = new URL(path, location.href);
  url.searchParams.set("token", TOKEN);
  return url.pathname + url.search;
}

// ws(s)://this-host/path?query: the pages always talk to the daemon that served them.
export function socketUrl(path, params = {}) {
  const url = new URL(withToken(path), location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, value);
  }
  return url.href;
}

export const STREAM_ID = /^[A-Za-z0-9._:-]{1,128}$/;

// Reconnect delays: 0.5 s doubling to 10 s, +-25 % jitter so many viewers do not return in step.
export function backoffMs(attempt) {
  const base = Math.min(10000, 500 * 2 ** attempt);
  return Math.round(base * (0.75 + Math.random() * 0.5));
}

// -- query options for looks ----------------------------------------------------------------------
function colour(value) {
  if (!value) return null;
  const v = /^[0-9a-f]{3,8}$/i.test(value) ? `#${value}` : value; // ?color=ffcc00 (no # in URLs)
  return CSS.supports("color", v) ? v : null;
}

function length(value) {
  if (!value) return null;
  const v = /^\d+(\.\d+)?$/.test(value) ? `${value}px` : value; // ?size=64 means 64px
  return /^\d+(\.\d+)?(px|pt|em|rem|vw|vh|vmin)$/.test(v) && CSS.supports("font-size", v) ? v : null;
}

export function flag(value) {
  return value !== null && !["0", "false", "no", "off"].includes(value.toLowerCase());
}

// Applies ?size= ?color= ?bg= ?unstable= ?font= ?align= ?transparent= ?box= ?status= to the page
// through CSS custom properties (no inline style attributes: the page's CSP forbids them).
export function applyLookOptions(params, root = document.documentElement) {
  // On <body>, so they win over the pages' own defaults (the speaker page's smaller captions).
  const set = (name, value) => { if (value) document.body.style.setProperty(name, value); };
  set("--caption-size", length(params.get("size")));
  set("--fg", colour(params.get("color") || params.get("fg")));
  set("--unstable-fg", colour(params.get("unstable")));
  const font = params.get("font");
  if (font && CSS.supports("font-family", font)) set("--font", font);
  const bg = params.get("bg");
  const transparent = flag(params.get("transparent")) || (bg || "").toLowerCase() === "transparent";
  if (transparent) {
    root.classList.add("transparent"); // for OBS browser sources: only the captions are drawn
    if (params.has("box") && !flag(params.get("box"))) root.classList.add("no-box");
  } else {
    set("--bg", colour(bg));
  }
  const align = params.get("align");
  if (["left", "center", "right"].includes(align)) set("--align", align);
  if (params.has("status") && !flag(params.get("status"))) root.classList.add("no-status");
}

// -- status pill ----------------------------------------------------------------------------------
export class Status {
  constructor(element) {
    this.element = element;
    this.text = element.querySelector(".status-text") || element;
    this.state = null;
  }

  set(state, message) {
    this.state = state;
    this.element.dataset.state = state;
    document.body.dataset.state = state;
    this.text.textContent = message;
  }
}

// -- caption lines --------------------------------------------------------------------------------
// One line per (segment, target language): a partial shows its stable (committed) text and the
// unstable tail styled apart; the final replaces both. Only the last `lines` lines (per language)
// are kept. Segment numbers start again at 0 when a stream is ingested anew (or the daemon
// restarts), so lines are keyed by an epoch that moves on when that happens.
export class CaptionView {
  constructor(root, { lines = 3, target = null } = {}) {
    this.root = root;
    this.list = root.querySelector(".lines") || root;
    this.maxLines = lines;
    this.target = target;
    this.epoch = 0;
    this.byKey = new Map();
    this.finalized = new Set();
    this.languages = new Set();
    this.follow = true; // auto-scroll unless the reader scrolled up
    root.addEventListener("scroll", () => {
      this.follow = root.scrollHeight - root.scrollTop - root.clientHeight < 48;
    });
  }

  // A new session or connection: the next segment 0 is a new line, not an update of the old one.
  newEpoch() {
    this.epoch += 1;
  }

  clear() {
    this.list.replaceChildren();
    this.byKey.clear();
    this.finalized.clear();
  }

  // Returns true when the event was shown.
  handle(event) {
    if (event.type !== "partial" && event.type !== "final") return false;
    if (this.target && event.target_lang !== this.target) return false;
    let key = `${this.epoch}/${event.target_lang}/${event.segment}`;
    if (this.finalized.has(key)) { // the stream started again: this is a new segment 0, 1, ...
      this.newEpoch();
      key = `${this.epoch}/${event.target_lang}/${event.segment}`;
    }
    if (!this.languages.has(event.target_lang)) {
      this.languages.add(event.target_lang);
      this.root.classList.toggle("multilingual", this.languages.size > 1);
    }
    if (event.type === "final" && event.dropped) { // not speech after all: clear what its partials showed
      const shown = this.byKey.get(key);
      if (shown) { shown.remove(); this.byKey.delete(key); }
      this.finalized.add(key);
      return false;
    }
    const line = this.byKey.get(key) || this.addLine(key, event);
    if (event.type === "final") {
      line.classList.remove("partial");
      line.classList.add("final");
      line.stable.textContent = event.text;
      line.unstable.textContent = "";
      this.finalized.add(key);
    } else {
      line.stable.textContent = event.stable;
      // The unstable tail keeps its separating space (none between CJK characters).
      line.unstable.textContent = joinText(event.stable, event.unstable).slice(event.stable.length);
    }
    this.scroll();
    return true;
  }

  addLine(key, event) {
    const line = document.createElement("div");
    line.className = "line partial";
    line.dataset.segment = event.segment;
    line.dataset.lang = event.target_lang || "";
    const lang = document.createElement("span");
    lang.className = "lang";
    lang.textContent = event.target_lang || "";
    const text = document.createElement("span");
    text.className = "text";
    line.stable = document.createElement("span");
    line.stable.className = "stable";
    line.unstable = document.createElement("span");
    line.unstable.className = "unstable";
    text.append(line.stable, line.unstable);
    line.append(lang, text);
    this.list.append(line);
    this.byKey.set(key, line);
    const keep = this.maxLines * Math.max(1, this.languages.size);
    while (this.list.children.length > keep) {
      const oldest = this.list.firstElementChild;
      for (const [k, el] of this.byKey) if (el === oldest) { this.byKey.delete(k); this.finalized.delete(k); }
      oldest.remove();
    }
    return line;
  }

  scroll() {
    if (this.follow) this.root.scrollTop = this.root.scrollHeight;
  }
}

export function intParam(params, name, fallback, min, max) {
  const value = Number.parseInt(params.get(name), 10);
  return Number.isFinite(value) ? Math.min(max, Math.max(min, value)) : fallback;
}
