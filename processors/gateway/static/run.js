// The live run view: follows GET /v1/runs/{run_id}/events with fetch() (EventSource cannot
// send an Authorization header, and a key in the URL would land in access logs), parses the
// server-sent events itself, reconnects with Last-Event-ID, and draws the run's DAG.
// The key may also come in the URL fragment (#run=<id>&key=<key>): fragments are never sent
// to a server; the page removes it from the address bar at once.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const FINAL = new Set(["completed", "failed", "cancelled"]);
const NODE_W = 190, NODE_H = 58, GAP_X = 60, GAP_Y = 22, PAD = 20;

let follow = null; // the current follow's AbortController
const view = { nodes: new Map(), edges: [], drawn: false, run: null, started: null };

function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function fmtMs(ms) {
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  return `${(ms / 1000).toFixed(1)} s`;
}

// Layers by longest path from the roots; nodes in a layer keep the run's order.
function layout(ids, edges) {
  const preds = new Map(ids.map((id) => [id, []]));
  for (const e of edges) if (preds.has(e.to) && preds.has(e.from)) preds.get(e.to).push(e.from);
  const depth = new Map();
  const visit = (id, seen) => {
    if (depth.has(id)) return depth.get(id);
    if (seen.has(id)) return 0; // not a DAG: cannot happen for a valid definition
    seen.add(id);
    const d = preds.get(id).reduce((m, p) => Math.max(m, visit(p, seen) + 1), 0);
    depth.set(id, d);
    return d;
  };
  ids.forEach((id) => visit(id, new Set()));
  const layers = [];
  for (const id of ids) (layers[depth.get(id)] ||= []).push(id);
  const pos = new Map();
  layers.forEach((layer, x) =>
    layer.forEach((id, y) => pos.set(id, { x: PAD + x * (NODE_W + GAP_X), y: PAD + y * (NODE_H + GAP_Y) })));
  const rows = Math.max(1, ...layers.map((l) => l.length));
  return { pos, width: PAD * 2 + layers.length * (NODE_W + GAP_X) - GAP_X, height: PAD * 2 + rows * (NODE_H + GAP_Y) - GAP_Y };
}

function draw(run, edges) {
  const svg = $("dag");
  svg.replaceChildren();
  const defs = el("defs", {}, svg);
  const m = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto" }, defs);
  el("path", { d: "M0,0 L10,5 L0,10 z", fill: "#9aa1ad" }, m);
  const ids = run.nodes.map((n) => n.node_id);
  const { pos, width, height } = layout(ids, edges);
  svg.setAttribute("width", Math.max(width, 320));
  svg.setAttribute("height", Math.max(height, 100));
  for (const e of edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
    el("path", { class: "edge", d: `M${x1},${y1} C${x1 + GAP_X / 2},${y1} ${x2 - GAP_X / 2},${y2} ${x2},${y2}` }, svg);
  }
  view.nodes.clear();
  for (const n of run.nodes) {
    const p = pos.get(n.node_id);
    const g = el("g", { class: "node", "data-node": n.node_id, transform: `translate(${p.x},${p.y})` }, svg);
    el("rect", { width: NODE_W, height: NODE_H }, g);
    const t1 = el("text", { class: "id", x: 10, y: 20 }, g);
    t1.textContent = `${n.node_id} · ${n.node_type}`;
    const t2 = el("text", { class: "meta", x: 10, y: 38 }, g);
    const t3 = el("text", { class: "meta", x: 10, y: 52 }, g);
    view.nodes.set(n.node_id, { g, t2, t3, status: null, attempt: 0, since: null, ended: null });
  }
  view.drawn = true;
}

function update(msg) {
  const run = msg.run;
  if (!view.drawn || msg.edges) draw(run, msg.edges || view.edges);
  if (msg.edges) view.edges = msg.edges;
  const at = msg.at_ms || Date.now();
  if (view.started === null) view.started = at;
  for (const n of run.nodes) {
    const v = view.nodes.get(n.node_id);
    if (!v) continue;
    if (n.status === "running" && (v.status !== "running" || v.attempt !== n.attempt)) { v.since = at; v.ended = null; }
    if (FINAL.has(n.status) || n.status === "succeeded") { if (v.ended === null) v.ended = at; }
    if (v.since === null && n.status !== "waiting") v.since = at;
    v.status = n.status;
    v.attempt = n.attempt;
    v.g.setAttribute("data-status", n.status);
    v.g.setAttribute("data-attempt", String(n.attempt));
    v.t2.textContent = n.attempt > 0 ? `${n.status} · attempt ${n.attempt}` : n.status;
  }
  view.run = run;
  $("run-label").textContent = run.run_id;
  $("workflow").textContent = `${run.workflow_id} v${run.version ?? "?"}`;
  const s = $("run-status");
  s.textContent = run.status + (run.reason ? ` (${run.reason})` : "");
  s.setAttribute("data-status", run.status);
  s.setAttribute("data-progress", String(msg.progress));
  if (FINAL.has(run.status)) view.finished = at;
  tick();
}

// Timings: observed from the stream's messages (their at_ms), refreshed every second.
function tick() {
  const now = Date.now();
  for (const v of view.nodes.values()) {
    if (v.since === null) { v.t3.textContent = ""; continue; }
    const end = v.ended ?? (FINAL.has(view.run?.status) ? view.finished : now);
    v.t3.textContent = (v.ended || FINAL.has(view.run?.status) ? "took " : "for ") + fmtMs(end - v.since);
  }
  if (view.started !== null) {
    const end = view.finished ?? now;
    $("elapsed").textContent = `elapsed ${fmtMs(end - view.started)} (observed)`;
  }
}
setInterval(tick, 1000);

// A server-sent events parser over a fetch() body.
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = { id: null, event: "message", data: [], retry: null };
      for (const line of block.split("\n")) {
        if (line === "" || line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") ev.data.push(val);
        else if (field === "id") ev.id = val;
        else if (field === "event") ev.event = val;
        else if (field === "retry") ev.retry = Number(val);
      }
      onEvent(ev);
    }
  }
}

async function start(runId, key) {
  if (follow) follow.abort();
  const ctl = new AbortController();
  follow = ctl;
  Object.assign(view, { nodes: new Map(), edges: [], drawn: false, run: null, started: null, finished: null });
  $("dag").replaceChildren();
  $("error").textContent = "";
  let last = null, retry = 1000;
  while (!ctl.signal.aborted) {
    $("connection").textContent = last === null ? "connecting…" : `reconnecting after event ${last}…`;
    try {
      const headers = { Authorization: `Bearer ${key}` };
      if (last !== null) headers["Last-Event-ID"] = last;
      const res = await fetch(`../v1/runs/${encodeURIComponent(runId)}/events`, { headers, signal: ctl.signal, cache: "no-store" });
      if (res.status === 204) break; // nothing after the final state we have
      if (!res.ok) {
        let detail = `${res.status}`;
        try { detail = (await res.json()).detail || detail; } catch (_) { /* not a problem body */ }
        $("error").textContent = detail;
        if (res.status === 429 || res.status === 503) { await sleep(1000 * Number(res.headers.get("retry-after") || 1)); continue; }
        break;
      }
      $("connection").textContent = "live";
      await readEvents(res, (ev) => {
        if (ev.retry !== null && Number.isFinite(ev.retry)) retry = ev.retry;
        if (ev.id !== null) last = ev.id;
        if (ev.event === "state" && ev.data.length) update(JSON.parse(ev.data.join("\n")));
      });
    } catch (e) {
      if (ctl.signal.aborted) return;
      $("error").textContent = String(e);
    }
    if (view.run && FINAL.has(view.run.status)) break;
    await sleep(retry);
  }
  if (!ctl.signal.aborted) $("connection").textContent = view.run && FINAL.has(view.run.status) ? "finished" : "stopped";
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

$("open").addEventListener("submit", (e) => {
  e.preventDefault();
  start($("run-id").value.trim(), $("key").value.trim());
});

// #run=<id>&key=<key>: follow at once, then drop the fragment from the address bar.
(() => {
  const p = new URLSearchParams(location.hash.slice(1));
  if (!p.get("run")) return;
  $("run-id").value = p.get("run");
  $("key").value = p.get("key") || "";
  history.replaceState(null, "", location.pathname + location.search);
  start(p.get("run"), p.get("key") || "");
})();
