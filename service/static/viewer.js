// vdib viewer: upload (POST /v1/naturalize) or live replay over WS /v1/stream (protocol v1).
// Plain JS, no build step. Protocol layouts: service/protocol.py and docs/service.md.
"use strict";

const $ = (id) => document.getElementById(id);
// phase: "idle" | "uploading" | "replaying" (upload) | "connecting" | "streaming" | "closed" | "done";
// the status line is final once phase is "closed" (live) or "done" (upload): tests wait on it.
const state = { ws: null, timer: null, frames: 0, t0: 0, stats: null, raster: [], nReadout: 0, running: false,
                phase: "idle", closeCode: null, sent: 0, packets: 0 };
window.vdib = state; // for tests and the console

function setStatus(text) { $("status").textContent = text; }
function setError(text) { $("error").textContent = text || ""; }
function authHeaders() {
  const key = $("apikey").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    const j = await r.json();
    const sel = $("model");
    sel.innerHTML = "";
    // "auto": no model in the request, so the service picks by the recording's sensor (docs/service.md)
    const auto = document.createElement("option");
    auto.value = ""; auto.textContent = "auto (by the recording's sensor)"; auto.selected = true;
    sel.appendChild(auto);
    for (const m of j.models || []) {
      const o = document.createElement("option");
      o.value = m.name; o.textContent = m.name + (m.family ? " (" + m.family + ")" : "");
      sel.appendChild(o);
    }
  } catch (e) { setError("models: " + e); }
}

// Images are drawn at their native resolution (a DAVIS346 frame on a 346x260 canvas), small ones
// (a 28x28 digit, a 26x26 crop) enlarged by a whole factor to about 280 pixels.
function nativeScale(w, h) { return Math.max(1, Math.floor(280 / Math.max(w, h))); }

async function drawPng(canvasId, bytes) {
  const bmp = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
  const c = $(canvasId), ctx = c.getContext("2d");
  const s = nativeScale(bmp.width, bmp.height);
  if (c.width !== bmp.width * s || c.height !== bmp.height * s) { c.width = bmp.width * s; c.height = bmp.height * s; }
  c.dataset.size = bmp.width + "x" + bmp.height;
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.drawImage(bmp, 0, 0, c.width, c.height);
  c.dataset.drawn = String(Number(c.dataset.drawn || 0) + 1);
}

// which model the service gave the recording, and why (the default-model rule)
function showModel(m) {
  state.model = m.model; state.family = m.family || null;
  const shape = m.image_shape ? m.image_shape[1] + "x" + m.image_shape[0] : "?";
  $("model-info").textContent = `model ${m.model}${m.family ? " (" + m.family + ")" : ""}: ${m.model_reason || ""}` +
    `; images ${shape}`;
  $("recon-title").textContent = "reconstruction " + shape;
  $("raster-panel").classList.toggle("hidden", !m.spikes);
}

// rows: array of Uint8Array(n) with 0/1; appended as columns, scrolling left.
function pushRaster(rows, n) {
  for (const r of rows) state.raster.push(r);
  const c = $("raster"), ctx = c.getContext("2d");
  const cols = c.width / 2;
  if (state.raster.length > cols) state.raster.splice(0, state.raster.length - cols);
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, c.width, c.height);
  const cell = c.height / Math.max(1, n);
  ctx.fillStyle = "#fc3";
  state.raster.forEach((row, x) => {
    for (let j = 0; j < n; j++) if (row[j]) ctx.fillRect(x * 2, j * cell, 2, Math.max(1, cell - 0.5));
  });
  c.dataset.drawn = String(Number(c.dataset.drawn || 0) + 1);
}

function unpackBits(bytes, rows, n) {
  const per = (n + 7) >> 3, out = [];
  for (let r = 0; r < rows; r++) {
    const row = new Uint8Array(n);
    for (let j = 0; j < n; j++) row[j] = (bytes[r * per + (j >> 3)] >> (j & 7)) & 1;
    out.push(row);
  }
  return out;
}

function b64bytes(s) { return Uint8Array.from(atob(s), (ch) => ch.charCodeAt(0)); }

function showStatus(extra) {
  const el = (performance.now() - state.t0) / 1000;
  const st = state.stats || {};
  setStatus(`frames ${state.frames}  (${(state.frames / Math.max(el, 1e-3)).toFixed(1)} /s)  ` +
    `bins ${st.bins ?? "-"}  dropped ${st.dropped_frames ?? 0}  late events ${st.late_events ?? 0}  ` +
    `latency p99 ${st.latency_ms_p99 != null ? st.latency_ms_p99.toFixed(1) + " ms" : "-"}` + (extra ? "\n" + extra : ""));
}

// ---------------------------------------------------------------- upload
async function upload() {
  const f = $("file").files[0];
  if (!f) { setError("choose a recording first"); return; }
  stop(); setError("");
  state.ws = null; state.frames = 0; state.raster = []; state.t0 = performance.now(); state.phase = "uploading";
  setStatus("uploading " + f.name + " …");
  const q = new URLSearchParams({ seed: $("seed").value, inputs: "true", spikes: "bitpacked", filename: f.name });
  if ($("model").value) q.set("model", $("model").value);
  const r = await fetch("/v1/naturalize?" + q, { method: "POST", body: f, headers: authHeaders() });
  if (!r.ok) {
    setError(`${r.status}: ${(await r.json().catch(() => ({}))).detail || r.statusText}`); state.phase = "done"; return;
  }
  const j = await r.json();
  showModel({ ...j, spikes: !!j.spikes, family: j.family });
  const raster = j.spikes ? unpackBits(b64bytes(j.spikes.data), j.spikes.rows, j.spikes.n_readout) : [];
  const n = j.spikes ? j.spikes.n_readout : 0;
  let i = 0, prevBin = -1;
  state.running = true; state.phase = "replaying"; $("stop").disabled = false;
  const frameMs = (j.emit === "last" ? 1 : j.emit) * j.dt_us / 1000 / Number($("speed").value);
  const step = async () => {
    if (!state.running || i >= j.frames.length) { state.running = false; $("stop").disabled = true;
      showStatus(`upload: ${j.stats.events} events, ${j.stats.bins} bins, spike rate ${j.stats.spike_rate.toFixed(3)}`);
      state.phase = "done"; return; }
    const fr = j.frames[i++];
    await drawPng("recon", b64bytes(fr.image));
    if (fr.input) await drawPng("events", b64bytes(fr.input));
    if (n) pushRaster(raster.slice(prevBin + 1, fr.bin + 1), n);
    prevBin = fr.bin; state.frames++;
    state.stats = { bins: fr.bin + 1 };
    showStatus("upload replay");
    state.timer = setTimeout(step, frameMs);
  };
  step();
}

// ---------------------------------------------------------------- live replay over the websocket
function parseFrame(buf) {
  const dv = new DataView(buf);
  const magic = String.fromCharCode(...new Uint8Array(buf, 0, 4));
  if (magic !== "VDFR") throw new Error("bad frame magic " + magic);
  const flags = dv.getUint8(5), bin = dv.getUint32(8, true), binEnd = Number(dv.getBigInt64(12, true));
  const l1 = dv.getUint32(20, true), l2 = dv.getUint32(24, true);
  const k = dv.getUint16(28, true), n = dv.getUint16(30, true);
  let o = 32;
  const image = new Uint8Array(buf, o, l1); o += l1;
  const input = (flags & 2) ? new Uint8Array(buf, o, l2) : null; o += l2;
  const spikes = (flags & 1) ? unpackBits(new Uint8Array(buf, o), k, n) : null;
  return { bin, binEnd, image, input, spikes, n };
}

async function replay() {
  const f = $("file").files[0];
  if (!f) { setError("choose a recording first"); return; }
  stop(); setError("");
  state.ws = null; state.phase = "connecting"; state.closeCode = null;
  setStatus("decoding " + f.name + " …");
  const r = await fetch("/v1/events?filename=" + encodeURIComponent(f.name), { method: "POST", body: f, headers: authHeaders() });
  if (!r.ok) {
    setError(`${r.status}: ${(await r.json().catch(() => ({}))).detail || r.statusText}`); state.phase = "done"; return;
  }
  const width = Number(r.headers.get("X-Sensor-Width")), height = Number(r.headers.get("X-Sensor-Height"));
  const packet = await r.arrayBuffer();
  const dv = new DataView(packet);
  const count = dv.getUint32(8, true);
  // cut the events into packets of 10 ms of event time
  const bounds = [];
  let tFirst = count ? Number(dv.getBigInt64(12, true)) : 0, next = tFirst + 10000;
  bounds.push([0, tFirst]);
  for (let i = 0; i < count; i++) {
    const t = Number(dv.getBigInt64(12 + 13 * i, true));
    if (t >= next) { bounds.push([i, t]); next = t - ((t - tFirst) % 10000) + 10000; }
  }
  bounds.push([count, null]);
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const key = $("apikey").value.trim();
  const ws = new WebSocket(`${proto}//${location.host}/v1/stream`, key ? ["vdib.v1", "bearer." + key] : ["vdib.v1"]);
  ws.binaryType = "arraybuffer";
  state.ws = ws; state.frames = 0; state.raster = []; state.stats = null; state.running = true;
  state.sent = 0; state.packets = bounds.length - 1;
  $("stop").disabled = false;
  const start = { type: "start", protocol: 1, sensor: { width, height }, seed: Number($("seed").value),
                  spikes: true, inputs: true, format: "binary" };
  if ($("model").value) start.model = $("model").value;
  ws.onopen = () => ws.send(JSON.stringify(start));
  // Messages are handled strictly in arrival order on one promise chain: a frame's handler awaits
  // image decoding, and without the chain a later "end" message or the close event would run in
  // between, after which the frame's handler would overwrite the final status. The close handler
  // is queued on the same chain, so it runs after every frame received before it.
  let chain = Promise.resolve();
  const mine = () => state.ws === ws; // a later replay or upload owns the page now
  const handle = async (ev) => {
    if (!mine()) return;
    if (typeof ev.data === "string") {
      const m = JSON.parse(ev.data);
      if (m.type === "ready") {
        state.nReadout = m.n_readout; state.t0 = performance.now(); state.phase = "streaming"; showModel(m); send(0);
      }
      else if (m.type === "stats" || m.type === "end") { state.stats = m; showStatus(m.type === "end" ? "stream ended" : "streaming"); }
      else if (m.type === "error") setError(`closed ${m.code}: ${m.message}`);
      return;
    }
    const fr = parseFrame(ev.data);
    state.frames++;
    await drawPng("recon", fr.image);
    if (fr.input) await drawPng("events", fr.input);
    if (fr.spikes) pushRaster(fr.spikes, fr.n);
    if (mine() && state.phase !== "closed") showStatus("streaming");
  };
  ws.onmessage = (ev) => { chain = chain.then(() => handle(ev)).catch((e) => setError(String(e))); };
  ws.onclose = (ev) => {
    chain = chain.then(() => {
      if (!mine()) return;
      state.running = false; $("stop").disabled = true;
      if (state.timer) clearTimeout(state.timer);
      state.closeCode = ev.code; state.phase = "closed";
      showStatus(`closed (${ev.code})`);
    });
  };
  const speed = Number($("speed").value);
  const send = (j) => {
    if (!state.running || ws.readyState !== WebSocket.OPEN) return;
    if (j >= bounds.length - 1) { ws.send(JSON.stringify({ type: "end" })); return; }
    const [a, ta] = bounds[j], [b] = bounds[j + 1];
    const head = new ArrayBuffer(12), hv = new DataView(head);
    new Uint8Array(head).set([86, 68, 69, 86]); // "VDEV"
    hv.setUint16(4, 1, true); hv.setUint16(6, 0, true); hv.setUint32(8, b - a, true);
    ws.send(new Blob([head, packet.slice(12 + 13 * a, 12 + 13 * b)]));
    state.sent = j + 1;
    const tNext = bounds[j + 1][1];
    const due = tNext == null ? 0 : state.t0 + (tNext - tFirst) / 1000 / speed - performance.now();
    state.timer = setTimeout(() => send(j + 1), Math.max(0, due));
  };
}

function stop() {
  state.running = false;
  if (state.timer) clearTimeout(state.timer);
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "end" }));
  $("stop").disabled = true;
}

$("upload").onclick = () => upload().catch((e) => setError(String(e)));
$("replay").onclick = () => replay().catch((e) => setError(String(e)));
$("stop").onclick = stop;
loadModels();
