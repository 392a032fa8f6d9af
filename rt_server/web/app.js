// rt_server web client: streams phonemes to /v1/stream and plays the audio through an AudioWorklet.
//
// One WebSocket session at a time (protocol v1, docs/protocol.md). Audio frames are decoded here and posted to
// the worklet (player-worklet.js), which owns a bounded ring buffer and counts underruns. The session asks for
// `pace: "realtime"`, so the server releases audio at most `lead_ms` ahead of real time and the browser never
// holds more than that (plus the preroll). Live figures are kept in `window.rtStats` for people and for tests.
"use strict";

const SAMPLES = [
  { label: "Hello world", text: "həlˈO wˈɜːld. ðɪs ɪz ɐ tˈɛst ʌv ðə spˈiːʧ sˈɪnθəsˌIzɚ." },
  { label: "Quick fox", text: "ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps ˌOvɚ ðə lˈAzi dˈɔɡ." },
  { label: "Robot", text: "wˈʌns əpˌɑn ɐ tˈIm, ðɛɹ wʌz ɐ lˈɪtᵊl ɹˈObɑt hˌu lˈʌvd tə sˈɪŋ." },
  {
    label: "Rights (long)",
    text:
      "ˈɔːl hjˈumən bˈiɪŋz ɑɹ bˈɔɹn fɹˈi ænd ˈikwəl ɪn dˈɪɡnᵻti ænd ɹˈIts. " +
      "ðA ɑɹ ɛndˈWd wɪð ɹˈizən ænd kˈɑnʃəns, ænd ʃˈʊd ˈækt təwˈɔɹdz wˈʌn ɐnˈʌðɚ ɪn ɐ spˈɪɹɪt ʌv bɹˈʌðɚhˌʊd.",
  },
];

const PREROLL_MS = 60; // audio the worklet waits for before it starts a turn (absorbs arrival jitter)
const RING_HEADROOM_MS = 2000; // ring capacity beyond lead_ms + preroll; overflow is counted, never expected
const LOG_LIMIT = 200; // lines kept in the message log
const SEGMENT_LIMIT = 64; // alignment segments kept (older ones have played out)
const METER_BARS = 100; // level history: one bar per worklet report (~20 ms), so about 2 s

const $ = (id) => document.getElementById(id);

// Everything the page shows, in plain numbers; tests read it from inside the page.
const stats = {
  status: "loading",
  sessionId: null,
  sampleRate: null,
  ttfaMs: null, // first `phonemes` of the run sent -> first audio frame received
  receivedSamples: 0,
  receivedS: 0,
  playedS: 0,
  bufferedMs: 0,
  underruns: 0,
  overflowSamples: 0,
  playback: "idle", // the worklet's state: idle | buffering | playing
  peak: 0,
  timelineMs: 0, // played position in the session's audio timeline
  framesReceived: 0,
  segments: 0,
  highlighted: 0, // phonemes highlighted so far in this run
  highlight: null, // {seq, index, phoneme}
  runs: 0,
  turnDone: false, // the run's flush came back and its audio has played out to the last sample
  cleared: 0,
  flushed: [],
  lastEvent: null,
  lastError: null,
  errors: [],
  closeCode: null,
  closeReason: null,
  events: [], // types of server events, in order (bounded)
};
window.rtStats = stats;

const audio = { ctx: null, worklet: null }; // the AudioContext and its worklet module (loaded once)
let session = null;
let run = null; // the current Speak: {flushId, timer, startedAt}
let flushCount = 0;
const meter = [];

// ---------------------------------------------------------------------------------------------------------
// Server lists

// The server's API key, when it requires one: typed into the page, or given in its address as `#api_key=KEY`
// (a fragment never reaches a server or its logs). Sent as `Authorization: Bearer` on HTTP and as `?api_key=`
// on the WebSocket (a browser cannot set headers there; docs/protocol.md).
function apiKey() {
  return $("api-key").value.trim();
}

async function getJson(path) {
  const key = apiKey();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch(path, { cache: "no-store", headers });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
  return body;
}

async function loadModels() {
  const body = await getJson("v1/models");
  const select = $("model");
  select.replaceChildren();
  for (const model of body.models) {
    const option = new Option(model.ready ? model.name : `${model.name} (loading)`, model.name);
    option.disabled = !model.ready;
    select.add(option);
  }
  select.value = body.default;
  await loadVoices();
}

async function loadVoices() {
  const model = $("model").value;
  const body = await getJson(`v1/voices?model=${encodeURIComponent(model)}`);
  const select = $("voice");
  select.replaceChildren(...body.voices.map((v) => new Option(v, v)));
  const first = body.voices.slice(0, 2);
  $("blend").placeholder = first.length === 2 ? `e.g. ${first[0]}:0.7,${first[1]}:0.3` : "e.g. a:0.7,b:0.3";
}

// ---------------------------------------------------------------------------------------------------------
// Audio

// Creates (or reuses) the AudioContext. Runs synchronously up to `new AudioContext`, so it stays inside the
// click's user activation (browsers start a context only from a gesture).
function ensureContext(rate) {
  if (audio.ctx && audio.ctx.sampleRate === rate && audio.ctx.state !== "closed") return audio.ctx;
  if (audio.ctx) audio.ctx.close();
  try {
    audio.ctx = new AudioContext({ sampleRate: rate, latencyHint: "interactive" });
  } catch (err) {
    // A browser that refuses this rate: run at its own rate and let the worklet resample.
    audio.ctx = new AudioContext({ latencyHint: "interactive" });
  }
  audio.worklet = audio.ctx.audioWorklet.addModule("player-worklet.js");
  return audio.ctx;
}

// A fresh player per session: its `consumed` counter is the session's audio timeline, which starts at 0.
async function newPlayer(ctx, rate, leadMs) {
  await audio.worklet;
  const node = new AudioWorkletNode(ctx, "ring-player", {
    numberOfInputs: 0,
    numberOfOutputs: 1,
    outputChannelCount: [1],
    processorOptions: {
      capacitySamples: Math.ceil(((leadMs + PREROLL_MS + RING_HEADROOM_MS) * rate) / 1000),
      prerollSamples: Math.round((PREROLL_MS * rate) / 1000),
      streamRate: rate,
    },
  });
  node.connect(ctx.destination);
  await ctx.resume();
  return node;
}

const MULAW = (() => {
  // G.711 µ-law to linear (ITU-T G.711), scaled to -1..1.
  const table = new Float32Array(256);
  for (let i = 0; i < 256; i++) {
    const u = ~i & 0xff;
    const exponent = (u >> 4) & 0x07;
    const magnitude = (((u & 0x0f) << 3) + 0x84) << exponent;
    table[i] = (u & 0x80 ? 0x84 - magnitude : magnitude - 0x84) / 32767;
  }
  return table;
})();

function decode(buffer, encoding) {
  if (encoding === "pcm_f32le") return new Float32Array(buffer);
  if (encoding === "mulaw") {
    const bytes = new Uint8Array(buffer);
    const out = new Float32Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) out[i] = MULAW[bytes[i]];
    return out;
  }
  const pcm = new Int16Array(buffer); // little-endian, as every browser platform is
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32767; // as the server scales
  return out;
}

function onPlayerStats(s, msg) {
  if (s !== session) return;
  const rate = s.rate;
  stats.playedS = msg.played / rate;
  stats.bufferedMs = (msg.buffered * 1000) / rate;
  stats.underruns = msg.underruns;
  stats.overflowSamples = msg.overflow;
  stats.playback = msg.state;
  stats.peak = msg.peak;
  const latencyMs = ((audio.ctx.baseLatency || 0) + (audio.ctx.outputLatency || 0)) * 1000;
  stats.timelineMs = Math.max(0, (msg.consumed * 1000) / rate - (msg.state === "playing" ? latencyMs : 0));
  meter.push(msg.peak);
  if (meter.length > METER_BARS) meter.shift();
  if (run && msg.drained === run.flushId) stats.turnDone = true;
}

// ---------------------------------------------------------------------------------------------------------
// Session

function readStart() {
  const blend = $("blend").value.trim();
  return {
    type: "start",
    model: $("model").value || undefined,
    voice: blend || $("voice").value || undefined,
    speed: Number($("speed").value),
    frame_ms: Number($("frame-ms").value),
    sample_rate: Number($("sample-rate").value),
    encoding: $("encoding").value,
    pace: "realtime",
    lead_ms: Number($("lead-ms").value),
    alignment: $("alignment").checked,
  };
}

async function ensureSession(start, ctx) {
  const key = JSON.stringify([start, apiKey()]);
  if (session && session.open && session.key === key) return session;
  if (session) dropSession(session);
  session = null;
  const node = await newPlayer(ctx, start.sample_rate, start.lead_ms); // before the socket: no audio waits
  const url = new URL("v1/stream", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey()) url.searchParams.set("api_key", apiKey());
  const s = {
    key,
    ws: new WebSocket(url),
    open: true,
    node,
    rate: start.sample_rate,
    encoding: start.encoding,
    discarding: false, // after `clear` until `cleared`: frames sent before the clear are dropped
    segments: [],
    shownSeq: null,
  };
  session = s;
  s.ws.binaryType = "arraybuffer";
  node.port.onmessage = (event) => onPlayerStats(s, event.data);
  setStatus("connecting…", "");
  const ready = new Promise((resolve, reject) => {
    s.onReady = resolve;
    s.onFail = reject;
  });
  s.ws.onopen = () => send(s, start);
  s.ws.onmessage = (event) => onMessage(s, event.data);
  s.ws.onclose = (event) => onClose(s, event);
  try {
    await ready;
  } catch (err) {
    node.disconnect();
    throw err;
  }
  return s;
}

function toPlayer(s, msg, transfer) {
  s.node.port.postMessage(msg, transfer || []);
}

function dropSession(s) {
  s.open = false;
  if (s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000);
  s.node.disconnect();
}

function send(s, msg) {
  if (s.ws.readyState !== WebSocket.OPEN) return false;
  s.ws.send(JSON.stringify(msg));
  const shown = msg.type === "phonemes" ? `phonemes ${JSON.stringify(msg.text)}` : JSON.stringify(msg);
  log(`→ ${shown}`, "sent");
  return true;
}

function onMessage(s, data) {
  if (typeof data !== "string") return onAudio(s, data);
  const event = JSON.parse(data);
  stats.events.push(event.type);
  if (stats.events.length > LOG_LIMIT) stats.events.shift();
  stats.lastEvent = event.type;
  if (event.type === "segment") {
    const span = `${Math.round(event.start_ms)}–${Math.round(event.start_ms + event.duration_ms)} ms`;
    log(`← segment ${event.seq} ${JSON.stringify(event.phonemes)} ${span}`, "");
  } else {
    log(`← ${data}`, event.type === "error" ? "error" : "");
  }
  switch (event.type) {
    case "ready":
      stats.sessionId = event.session_id;
      stats.sampleRate = event.settings.sample_rate;
      setStatus(`live · ${event.settings.model} · ${event.settings.voice}`, "live");
      s.onReady(event);
      break;
    case "segment":
      if (s.discarding) break; // its audio was sent before the `clear`: it will not play
      s.segments.push(event);
      if (s.segments.length > SEGMENT_LIMIT) s.segments.shift();
      stats.segments += 1;
      break;
    case "flushed":
      stats.flushed.push(event.id);
      if (stats.flushed.length > LOG_LIMIT) stats.flushed.shift();
      stats.lastEvent = `flushed ${event.id}`;
      toPlayer(s, { type: "end", turn: event.id }); // the turn's audio is all here: running dry next is its end
      break;
    case "cleared":
      s.discarding = false;
      stats.cleared += 1;
      break;
    case "done":
      toPlayer(s, { type: "end", turn: "done" });
      break;
    case "error":
      stats.lastError = event;
      stats.errors.push(event);
      showError(
        `${event.code}: ${event.message}` +
          (event.symbols ? ` [${event.symbols.join(" ")}]` : "") +
          (event.close_code ? ` (closing with ${event.close_code})` : ""),
      );
      break;
  }
  return undefined;
}

function onAudio(s, buffer) {
  const samples = decode(buffer, s.encoding);
  if (s.discarding) {
    toPlayer(s, { type: "skip", samples: samples.length }); // still on the timeline, never played
    return;
  }
  stats.framesReceived += 1;
  stats.receivedSamples += samples.length;
  stats.receivedS = stats.receivedSamples / s.rate;
  if (run && stats.ttfaMs === null && run.startedAt !== null) stats.ttfaMs = performance.now() - run.startedAt;
  toPlayer(s, { type: "push", samples }, [samples.buffer]);
}

const CLOSE_NAMES = {
  1000: "normal",
  1001: "going away",
  1003: "unsupported data",
  1006: "abnormal (no close frame)",
  1007: "invalid payload",
  1008: "policy violation",
  1009: "message too big",
  1011: "internal error",
  1013: "try again later",
};

function onClose(s, event) {
  s.open = false;
  stats.closeCode = event.code;
  stats.closeReason = event.reason;
  const what = `${event.code} ${CLOSE_NAMES[event.code] || ""}${event.reason ? ` · ${event.reason}` : ""}`;
  log(`closed ${what}`, event.code === 1000 ? "" : "error");
  if (s.onFail) s.onFail(new Error(`connection closed: ${what}`));
  if (s !== session) return;
  toPlayer(s, { type: "end", turn: "closed" });
  if (event.code === 1000) {
    setStatus("session ended", "");
  } else {
    setStatus(`closed ${event.code}`, "bad");
    showError(`connection closed: ${what}`);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Buttons

let connecting = false; // a Speak is opening its session: further clicks wait for it

// Speak replaces whatever is still being sent or played (a barge-in, as Stop), then streams the text.
async function onSpeak() {
  if (connecting) return;
  const start = readStart();
  const text = $("text").value;
  hideError();
  if (run && !stats.turnDone) onStop();
  stopRun();
  resetRunStats(); // now, not once the session is open: the figures never mix two runs
  connecting = true;
  try {
    const ctx = ensureContext(start.sample_rate); // first, while the click still counts as a gesture
    const s = await ensureSession(start, ctx);
    beginRun(s, text);
  } catch (err) {
    showError(String(err.message || err));
  } finally {
    connecting = false;
  }
}

function resetRunStats() {
  stats.runs += 1;
  stats.ttfaMs = null;
  stats.receivedSamples = 0;
  stats.receivedS = 0;
  stats.playedS = 0;
  stats.underruns = 0;
  stats.framesReceived = 0;
  stats.highlighted = 0;
  stats.highlight = null;
  stats.turnDone = false;
}

// Sends `text` a word at a time (each with its trailing whitespace, as a language model would emit tokens) or
// all at once, then a flush that ends the turn.
function beginRun(s, text) {
  toPlayer(s, { type: "resetStats" });
  const words = $("word-mode").checked ? text.match(/\S+\s*/g) || [] : [text];
  const intervalMs = Math.max(0, Number($("interval-ms").value) || 0);
  run = { flushId: `speak-${stats.runs}`, timer: null, startedAt: null };
  const current = run;
  let i = 0;
  const next = () => {
    if (run !== current || s !== session) return;
    if (i < words.length) {
      if (current.startedAt === null) current.startedAt = performance.now();
      send(s, { type: "phonemes", text: words[i++] });
      current.timer = setTimeout(next, intervalMs);
    } else {
      current.timer = null;
      send(s, { type: "flush", id: current.flushId });
    }
  };
  next();
}

function stopRun() {
  if (run && run.timer !== null) clearTimeout(run.timer);
  run = null;
}

// Barge-in: stop sending, tell the server to drop everything, and silence the player at once.
function onStop() {
  stopRun();
  if (!session || !session.open) return;
  session.discarding = true;
  toPlayer(session, { type: "clear" });
  send(session, { type: "clear" });
  meter.fill(0);
  session.segments = [];
  session.shownSeq = null;
  $("alignment-view").replaceChildren();
}

function onFlush() {
  if (!session || !session.open) return;
  send(session, { type: "flush", id: `flush-${++flushCount}` });
}

function onEndSession() {
  stopRun();
  if (session && session.open) send(session, { type: "close" });
}

// ---------------------------------------------------------------------------------------------------------
// Rendering

function setStatus(text, kind) {
  stats.status = text;
  const pill = $("status");
  pill.textContent = text;
  pill.className = `pill ${kind || ""}`;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function log(text, kind) {
  const list = $("log");
  const item = document.createElement("li");
  item.textContent = text;
  if (kind) item.className = kind;
  list.append(item);
  while (list.childElementCount > LOG_LIMIT) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

function fmtS(seconds) {
  return `${seconds.toFixed(2)} s`;
}

function renderFigures() {
  $("f-ttfa").textContent = stats.ttfaMs === null ? "–" : `${Math.round(stats.ttfaMs)} ms`;
  $("f-received").textContent = fmtS(stats.receivedS);
  $("f-played").textContent = fmtS(stats.playedS);
  $("f-buffered").textContent = `${Math.round(stats.bufferedMs)} ms`;
  $("f-underruns").textContent = String(stats.underruns);
  $("f-underruns").className = stats.underruns > 0 ? "bad" : "";
  $("f-playback").textContent = stats.overflowSamples ? `${stats.playback} (overflow!)` : stats.playback;
  $("f-event").textContent = stats.lastEvent || "–";
  const open = Boolean(session && session.open);
  for (const id of ["stop", "flush", "end-session"]) $(id).disabled = !open;
  $("speak").disabled = connecting;
}

function renderMeter() {
  const canvas = $("meter");
  const g = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  g.clearRect(0, 0, w, h);
  const barW = w / METER_BARS;
  meter.forEach((peak, i) => {
    // dB scale, -60..0 dBFS: quiet speech (and the tiny test model's noise) stays visible.
    const level = peak > 0 ? Math.min(1, Math.max(0, (20 * Math.log10(peak) + 60) / 60)) : 0;
    const barH = Math.max(1, level * (h - 4));
    g.fillStyle = peak > 0.95 ? "#f87171" : "#34d399";
    g.fillRect(i * barW, (h - barH) / 2, Math.max(1, barW - 1), barH);
  });
}

// Highlights the phoneme at the played position, from the `segment` events' per-phoneme timings.
function renderAlignment() {
  const s = session;
  if (!s || s.segments.length === 0) return;
  const t = stats.timelineMs;
  let segment = null;
  for (const seg of s.segments) {
    if (seg.start_ms <= t) segment = seg;
    else break;
  }
  if (!segment) return;
  const view = $("alignment-view");
  if (s.shownSeq !== segment.seq) {
    s.shownSeq = segment.seq;
    view.replaceChildren(
      ...Array.from(segment.phonemes).map((ch) => {
        const span = document.createElement("span");
        span.textContent = ch;
        return span;
      }),
    );
  }
  const index = segment.timings.findIndex(([a, b]) => a <= t && t < b);
  const spans = view.children;
  const endOf = segment.start_ms + segment.duration_ms;
  for (let i = 0; i < spans.length; i++) {
    const past = t >= endOf || (index >= 0 ? i < index : segment.timings[i][1] <= t);
    spans[i].className = i === index ? "now" : past ? "past" : "";
  }
  const previous = stats.highlight;
  if (index >= 0 && (!previous || previous.seq !== segment.seq || previous.index !== index)) {
    stats.highlighted += 1;
    stats.highlight = { seq: segment.seq, index, phoneme: spans[index].textContent };
  }
}

function render() {
  renderFigures();
  renderMeter();
  renderAlignment();
}

// ---------------------------------------------------------------------------------------------------------
// Start-up

function init() {
  const samples = $("samples");
  for (const sample of SAMPLES) {
    const button = document.createElement("button");
    button.textContent = sample.label;
    button.title = sample.text;
    button.addEventListener("click", () => {
      $("text").value = sample.text;
    });
    samples.append(button);
  }
  $("speak").addEventListener("click", onSpeak);
  $("stop").addEventListener("click", onStop);
  $("flush").addEventListener("click", onFlush);
  $("end-session").addEventListener("click", onEndSession);
  $("model").addEventListener("change", () => loadVoices().catch((err) => showError(String(err.message))));
  takeKeyFromAddress();
  $("api-key").addEventListener("change", refresh);
  window.addEventListener("hashchange", () => takeKeyFromAddress() && refresh());
  setInterval(render, 50);
  refresh();
}

// `#api_key=KEY` in the page's address: the key goes into the field and out of the address bar.
function takeKeyFromAddress() {
  const given = new URLSearchParams(location.hash.slice(1)).get("api_key");
  if (!given) return false;
  $("api-key").value = given;
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

function refresh() {
  hideError();
  loadModels().then(
    () => setStatus("ready to speak", ""),
    (err) => {
      const unauthorized = /unauthori[sz]ed/i.test(err.message);
      setStatus(unauthorized ? "API key needed" : "server unavailable", "bad");
      showError(`cannot list models: ${err.message}`);
    },
  );
}

init();
