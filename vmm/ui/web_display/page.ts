// The web display's page: one HTML document with its style and script inline, served from memory (no
// CDN, no other request). The script speaks protocol.ts: it draws rectangle messages onto a canvas with
// putImageData, acks each batch, sends keyboard/mouse/touch as JSON, and plots the copy counters: the
// guest's transfers and the display path's own (scanouts read back, bytes sent to display clients).
// window.__denovm exposes what it received (frames, rectangles, stats) for tests and the fps bench.

const STYLE = `
  :root { color-scheme: dark; font: 13px system-ui, sans-serif; }
  body { margin: 0; background: #111; color: #ddd; display: flex; gap: 12px; padding: 8px; box-sizing: border-box; }
  #screen-box { flex: 0 1 auto; min-width: 0; }
  #screen { display: block; background: #000; outline: 1px solid #333; touch-action: none; cursor: default;
    max-width: calc(100vw - 520px); max-height: calc(100vh - 40px); image-rendering: pixelated; }
  #screen:focus { outline: 1px solid #4a8; }
  #status { margin-top: 4px; color: #999; }
  aside { flex: 0 0 490px; position: relative; }
  h2 { font-size: 13px; margin: 0 0 4px; font-weight: 600; }
  #plot { background: #1a1a1a; outline: 1px solid #333; }
  #legend { list-style: none; padding: 0; margin: 6px 0; }
  #legend li { display: flex; gap: 6px; align-items: baseline; }
  #legend .sw { width: 10px; height: 10px; display: inline-block; }
  #legend .rate { margin-left: auto; font-variant-numeric: tabular-nums; }
  #legend .total { color: #888; min-width: 120px; text-align: right; font-variant-numeric: tabular-nums; }
  #tip { position: absolute; display: none; background: #222e; border: 1px solid #555; padding: 6px;
    pointer-events: none; white-space: pre; font: 12px ui-monospace, monospace; z-index: 2; }
  #mapped { color: #999; }
`;

const SCRIPT = String.raw`
(() => {
  "use strict";
  // protocol.ts: rectangle header offsets and flags.
  const HDR = 20, ENC_RAW = 0, ENC_DEFLATE = 1, ENC_PNG = 2, FLAG_LAST = 1;
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const scanout = params.get("scanout") || "0";
  const screen = document.getElementById("screen");
  const ctx = screen.getContext("2d");
  const statusEl = document.getElementById("status");
  const state = { connected: false, hello: null, frames: 0, rects: [], rectBytes: 0, statsCount: 0,
    lastStats: null, rates: null, history: [], errors: 0, drawMs: 0 };
  window.__denovm = state;
  let ws = null, drawing = Promise.resolve();
  const frameTimes = [];

  function send(m) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(m)); }
  function status() {
    const now = performance.now();
    while (frameTimes.length && frameTimes[0] < now - 1000) frameTimes.shift();
    statusEl.textContent = (state.connected ? "connected" : "disconnected") + " \u00b7 scanout " + scanout +
      " \u00b7 " + screen.width + "x" + screen.height + " \u00b7 " + frameTimes.length + " fps";
  }
  setInterval(status, 500);

  function connect() {
    const q = "?scanout=" + encodeURIComponent(scanout) + (token ? "&token=" + encodeURIComponent(token) : "");
    ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws" + q);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { state.connected = true; status(); };
    ws.onclose = () => { state.connected = false; status(); setTimeout(connect, 2000); };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        let m; try { m = JSON.parse(ev.data); } catch (_) { state.errors++; return; }
        if (m.t === "hello") { state.hello = m; if (screen.width !== m.width || screen.height !== m.height) {
          screen.width = m.width; screen.height = m.height; } }
        else if (m.t === "stats") onStats(m);
        return;
      }
      // Each rectangle starts decoding as soon as it arrives; they are drawn in arrival order.
      const decoded = decodeRect(ev.data);
      decoded.catch(() => {});
      drawing = drawing.then(() => decoded).then(drawRect).catch(() => { state.errors++; });
    };
  }

  // Inflate a whole deflate-raw message: the writer gets the one chunk, the reader's chunks are joined.
  // (A Blob -> stream -> Response pipe took ~1.8x longer for the same 8 MB here.)
  async function inflate(bytes, size) {
    const ds = new DecompressionStream("deflate-raw");
    const w = ds.writable.getWriter();
    w.write(bytes).catch(() => {});
    w.close().catch(() => {});
    const r = ds.readable.getReader();
    const out = new Uint8ClampedArray(size);
    let n = 0;
    for (;;) {
      const { done, value } = await r.read();
      if (done) break;
      if (n + value.length > size) throw new Error("inflated rect too large");
      out.set(value, n);
      n += value.length;
    }
    if (n !== size) throw new Error("inflated rect too small");
    return out;
  }

  async function decodeRect(buf) {
    if (buf.byteLength < HDR) throw new Error("short rect message");
    const t0 = performance.now();
    const v = new DataView(buf);
    const m = { enc: v.getUint8(1), flags: v.getUint8(2), seq: v.getUint32(4, true),
      x: v.getUint16(8, true), y: v.getUint16(10, true), w: v.getUint16(12, true), h: v.getUint16(14, true),
      fw: v.getUint16(16, true), fh: v.getUint16(18, true), bytes: buf.byteLength, px: null, bitmap: null,
      decodeMs: 0 };
    const size = m.w * m.h * 4;
    if (m.enc === ENC_RAW) m.px = new Uint8ClampedArray(buf, HDR);
    else if (m.enc === ENC_DEFLATE) m.px = await inflate(new Uint8Array(buf, HDR), size);
    else if (m.enc === ENC_PNG) {
      // Decoded by the browser (off the main thread); no colour management, so the pixels stay exact.
      m.bitmap = await createImageBitmap(new Blob([new Uint8Array(buf, HDR)], { type: "image/png" }),
        { colorSpaceConversion: "none", premultiplyAlpha: "none" });
      if (m.bitmap.width !== m.w || m.bitmap.height !== m.h) { m.bitmap.close(); throw new Error("bad png rect"); }
    }
    if (!m.bitmap && (!m.px || m.px.length !== size)) throw new Error("bad rect");
    m.decodeMs = performance.now() - t0;
    return m;
  }

  let batchDecodeMs = 0, batchDrawMs = 0;
  function drawRect(m) {
    if (screen.width !== m.fw || screen.height !== m.fh) { screen.width = m.fw; screen.height = m.fh; }
    const t0 = performance.now();
    if (m.bitmap) {
      ctx.drawImage(m.bitmap, m.x, m.y);
      m.bitmap.close();
    } else if (m.w > 0 && m.h > 0) ctx.putImageData(new ImageData(m.px, m.w, m.h), m.x, m.y);
    const t = performance.now();
    state.drawMs += t - t0;
    batchDrawMs += t - t0;
    batchDecodeMs += m.decodeMs;
    state.rects.push({ seq: m.seq, x: m.x, y: m.y, w: m.w, h: m.h, flags: m.flags, enc: m.enc, bytes: m.bytes, t });
    if (state.rects.length > 1000) state.rects.splice(0, state.rects.length - 1000);
    state.rectBytes += m.bytes;
    if (m.flags & FLAG_LAST) {
      state.frames++; frameTimes.push(t);
      send({ t: "ack", seq: m.seq, decodeMs: batchDecodeMs, drawMs: batchDrawMs });
      batchDecodeMs = 0; batchDrawMs = 0;
    }
  }

  // ---- input ----
  function fbPos(ev) {
    const r = screen.getBoundingClientRect();
    const x = Math.floor((ev.clientX - r.left) * screen.width / Math.max(1, r.width));
    const y = Math.floor((ev.clientY - r.top) * screen.height / Math.max(1, r.height));
    return { x: Math.max(0, Math.min(screen.width - 1, x)), y: Math.max(0, Math.min(screen.height - 1, y)) };
  }
  // PointerEvent.buttons bit -> MouseEvent.button.
  const BUTTON_BITS = [[1, 0], [2, 2], [4, 1], [8, 3], [16, 4]];
  let mouseButtons = 0, lastMouse = null;
  function onMouse(ev) {
    const p = fbPos(ev);
    if (!lastMouse || lastMouse.x !== p.x || lastMouse.y !== p.y) {
      send({ t: "pointer", kind: "move", x: p.x, y: p.y }); lastMouse = p;
    }
    const b = ev.buttons | 0;
    for (const [bit, button] of BUTTON_BITS) {
      if ((b & bit) && !(mouseButtons & bit)) send({ t: "pointer", kind: "down", x: p.x, y: p.y, button });
      if (!(b & bit) && (mouseButtons & bit)) send({ t: "pointer", kind: "up", x: p.x, y: p.y, button });
    }
    mouseButtons = b;
  }
  function onPointer(ev) {
    if (ev.pointerType === "touch") {
      const p = fbPos(ev);
      const kind = ev.type === "pointerdown" ? "down" : ev.type === "pointermove" ? "move" : "up";
      send({ t: "touch", kind, id: ev.pointerId, x: p.x, y: p.y });
    } else onMouse(ev);
    if (ev.type === "pointerdown") {
      screen.focus();
      try { screen.setPointerCapture(ev.pointerId); } catch (_) { /* not capturable */ }
    }
    ev.preventDefault();
  }
  for (const t of ["pointerdown", "pointermove", "pointerup", "pointercancel"]) screen.addEventListener(t, onPointer);
  screen.addEventListener("contextmenu", (ev) => ev.preventDefault());
  let wheelAcc = 0;
  screen.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    wheelAcc += ev.deltaMode === 1 ? ev.deltaY * 33 : ev.deltaMode === 2 ? ev.deltaY * 100 : ev.deltaY;
    const clicks = Math.trunc(wheelAcc / 100);
    if (clicks) { wheelAcc -= clicks * 100; send({ t: "wheel", clicks: -clicks }); }
  }, { passive: false });
  const keysDown = new Set();
  function onKey(ev) {
    if (!ev.code || ev.isComposing) return;
    ev.preventDefault();
    const down = ev.type === "keydown";
    if (down && ev.repeat) return; // the guest repeats keys itself (EV_REP)
    if (down) keysDown.add(ev.code); else keysDown.delete(ev.code);
    send({ t: "key", code: ev.code, down });
  }
  document.addEventListener("keydown", onKey);
  document.addEventListener("keyup", onKey);
  window.addEventListener("blur", () => {
    for (const code of keysDown) send({ t: "key", code, down: false });
    keysDown.clear();
  });

  // ---- copy counters plot ----
  const SERIES = [
    { key: "virtio", label: "virtio transfers", color: "#f28e2b", fields: ["transferToHostBytes", "transferFromHostBytes"] },
    { key: "stream", label: "in-stream transfers", color: "#4e79a7",
      fields: ["streamToHostBytes", "streamFromHostBytes", "copyTransferToHostBytes", "copyTransferFromHostBytes"] },
    { key: "inline", label: "inline writes", color: "#59a14f", fields: ["inlineWriteBytes"] },
    { key: "blob", label: "served via mapped blobs", color: "#b07aa1", fields: ["copiesAvoidedBytes"] },
    { key: "readback", label: "scanout read back (display)", color: "#e15759", fields: ["scanoutReadbackBytes"] },
    { key: "sent", label: "sent to display clients", color: "#edc948", fields: ["displaySentBytes"] },
  ];
  const HISTORY = 120;
  const plot = document.getElementById("plot"), pctx = plot.getContext("2d");
  const tip = document.getElementById("tip");
  const legend = document.getElementById("legend");
  for (const s of SERIES) {
    const li = document.createElement("li");
    li.dataset.series = s.key;
    li.innerHTML = '<span class="sw"></span><span class="label"></span><span class="rate">-</span>' +
      '<span class="total" data-total="0">-</span>';
    li.querySelector(".sw").style.background = s.color;
    li.querySelector(".label").textContent = s.label;
    legend.appendChild(li);
  }
  function fmtBytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
    while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + " " + u[i];
  }
  function sums(c) {
    const o = {};
    for (const s of SERIES) { let n = 0; for (const f of s.fields) n += Number(c && c[f]) || 0; o[s.key] = n; }
    return o;
  }
  let prev = null, hover = -1;
  function onStats(m) {
    const st = m.stats || {};
    const cur = { time: m.time, totals: sums(st.totals), res: {} };
    for (const [id, c] of Object.entries(st.resources || {})) cur.res[id] = sums(c);
    if (prev && cur.time > prev.time) {
      const dt = (cur.time - prev.time) / 1000;
      const rate = (a, b) => { const o = {}; for (const s of SERIES) o[s.key] = Math.max(0, (a[s.key] - (b ? b[s.key] : 0)) / dt); return o; };
      const point = { time: cur.time, rates: rate(cur.totals, prev.totals), res: {} };
      for (const id of Object.keys(cur.res)) {
        const r = rate(cur.res[id], prev.res[id]);
        if (SERIES.some((s) => r[s.key] > 0)) point.res[id] = r;
      }
      state.history.push(point);
      if (state.history.length > HISTORY) state.history.shift();
      state.rates = point.rates;
    }
    prev = cur;
    state.statsCount++;
    state.lastStats = st;
    for (const s of SERIES) {
      const li = legend.querySelector('[data-series="' + s.key + '"]');
      li.querySelector(".rate").textContent = state.rates ? fmtBytes(state.rates[s.key]) + "/s" : "-";
      const tot = li.querySelector(".total");
      tot.dataset.total = String(cur.totals[s.key]);
      tot.textContent = "total " + fmtBytes(cur.totals[s.key]);
    }
    const mapped = st.mapped || {};
    document.getElementById("mapped").textContent = "blobs mapped now: " + (mapped.count || 0) + " (" +
      fmtBytes(mapped.bytes || 0) + ")" + (st.backend ? " \u00b7 backend " + st.backend : "") +
      Object.entries(st.scanouts || {}).map(([id, c]) => " \u00b7 scanout " + id + ": " + (c.flushes || 0) +
        " flushes, read back " + fmtBytes(c.readbackBytes || 0) + ", sent " +
        fmtBytes(Object.values(c.sentTo || {}).reduce((a, b) => a + (Number(b) || 0), 0))).join("");
    drawPlot();
    if (hover >= 0) showTip(hover);
  }
  const PAD_L = 64, PAD_B = 16, PAD_T = 8;
  function yMax() {
    let m = 0;
    for (const p of state.history) for (const s of SERIES) m = Math.max(m, p.rates[s.key]);
    if (m <= 0) return 1024;
    const p = Math.pow(2, Math.ceil(Math.log2(m)));
    return p;
  }
  function xOf(i) { return PAD_L + (plot.width - PAD_L - 4) * (i + HISTORY - state.history.length) / (HISTORY - 1); }
  function drawPlot() {
    const W = plot.width, H = plot.height, top = yMax(), h = H - PAD_B - PAD_T;
    pctx.clearRect(0, 0, W, H);
    pctx.font = "11px sans-serif"; pctx.fillStyle = "#888"; pctx.strokeStyle = "#333"; pctx.lineWidth = 1;
    for (let g = 0; g <= 4; g++) {
      const y = PAD_T + h - h * g / 4;
      pctx.beginPath(); pctx.moveTo(PAD_L, y + 0.5); pctx.lineTo(W, y + 0.5); pctx.stroke();
      pctx.fillText(fmtBytes(top * g / 4) + "/s", 2, y + 4);
    }
    pctx.fillText("last " + (HISTORY / 2) + " s", PAD_L, H - 3);
    for (const s of SERIES) {
      pctx.strokeStyle = s.color; pctx.lineWidth = 2; pctx.beginPath();
      state.history.forEach((p, i) => {
        const x = xOf(i), y = PAD_T + h - h * p.rates[s.key] / top;
        if (i === 0) pctx.moveTo(x, y); else pctx.lineTo(x, y);
      });
      pctx.stroke();
    }
    if (hover >= 0 && hover < state.history.length) {
      pctx.strokeStyle = "#aaa"; pctx.lineWidth = 1; pctx.beginPath();
      pctx.moveTo(xOf(hover) + 0.5, PAD_T); pctx.lineTo(xOf(hover) + 0.5, PAD_T + h); pctx.stroke();
    }
  }
  function showTip(i) {
    const p = state.history[i];
    if (!p) { tip.style.display = "none"; return; }
    const lines = [((performance.now() - p.time) / 1000).toFixed(1) + " s ago"];
    for (const s of SERIES) lines.push(s.label + ": " + fmtBytes(p.rates[s.key]) + "/s");
    const ids = Object.keys(p.res).sort((a, b) => total(p.res[b]) - total(p.res[a]));
    if (ids.length === 0) lines.push("no resource copied in this interval");
    for (const id of ids.slice(0, 12)) {
      const parts = SERIES.filter((s) => p.res[id][s.key] > 0).map((s) => s.key + " " + fmtBytes(p.res[id][s.key]) + "/s");
      lines.push("resource " + id + ": " + parts.join(", "));
    }
    if (ids.length > 12) lines.push("... " + (ids.length - 12) + " more resources");
    tip.textContent = lines.join("\n");
    tip.style.display = "block";
    tip.style.left = Math.min(xOf(i) + 8, 250) + "px";
    tip.style.top = (plot.offsetTop + 20) + "px";
  }
  function total(r) { let n = 0; for (const s of SERIES) n += r[s.key]; return n; }
  plot.addEventListener("mousemove", (ev) => {
    const r = plot.getBoundingClientRect();
    const x = (ev.clientX - r.left) * plot.width / r.width;
    const n = state.history.length;
    if (n === 0) return;
    let best = 0;
    for (let i = 0; i < n; i++) if (Math.abs(xOf(i) - x) < Math.abs(xOf(best) - x)) best = i;
    hover = best; showTip(best); drawPlot();
  });
  plot.addEventListener("mouseleave", () => { hover = -1; tip.style.display = "none"; drawPlot(); });
  drawPlot();
  connect();
})();
`;

export function pageHtml(): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>denovm display</title>
<style>${STYLE}</style>
</head>
<body>
<div id="screen-box">
  <canvas id="screen" width="1" height="1" tabindex="0"></canvas>
  <div id="status">connecting</div>
</div>
<aside>
  <h2>virtio-gpu copies (bytes/s; hover for resources)</h2>
  <canvas id="plot" width="480" height="200"></canvas>
  <ul id="legend"></ul>
  <div id="mapped"></div>
  <div id="tip"></div>
</aside>
<script>${SCRIPT}</script>
</body>
</html>
`;
}
