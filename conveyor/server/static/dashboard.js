// The live batch view: reads /v1/engine/config once and the step stream /v1/engine/steps, and redraws at
// most once per animation frame. Plain canvas, nothing fetched from elsewhere. Under `conveyor serve --ray`
// the config lists the replicas: one is shown at a time, picked in the header (`?replica=` on the stream).
"use strict";

const KEY_STORAGE = "conveyor-api-key";
const FINISHED_KEPT = 20;
const RETRY_MS = 1000;

const state = {
  config: null,
  steps: [],            // the last config.timeline.steps step events, oldest first
  lastId: null,         // the newest step index received, sent back as Last-Event-ID on reconnect
  requests: new Map(),  // request id -> its latest update (tokens, times)
  finished: [],         // newest first
  dirty: false,
  replica: null,        // the replica shown (conveyor serve --ray), else null
  stream: null,         // the AbortController of the step stream being read
};

const byId = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, live = false) {
  const status = byId("status");
  status.textContent = text;
  status.classList.toggle("live", live);
}

// ---- connecting ---------------------------------------------------------------------------------

function askForKey(message) {
  const form = byId("key-form");
  form.hidden = false;
  byId("key-error").textContent = message;
  setStatus("API key needed");
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, byId("key-input").value);
    form.hidden = true;
    start();
  };
}

async function start() {
  const needsKey = document.documentElement.dataset.requiresKey === "true";
  if (needsKey && !sessionStorage.getItem(KEY_STORAGE)) {
    askForKey("");
    return;
  }
  const response = await fetch("/v1/engine/config", { headers: authHeaders() });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    askForKey("that key was refused");
    return;
  }
  state.config = await response.json();
  showConfig(state.config);
  showReplicas(state.config.replicas);
  requestAnimationFrame(renderLoop);
  streamSteps();
}

// ---- replicas (conveyor serve --ray) -------------------------------------------------------------

function showReplicas(replicas) {
  if (!replicas) return;
  if (!replicas.includes(state.replica)) state.replica = replicas[0] ?? null;
  const picker = byId("replica");
  picker.replaceChildren(...replicas.map((id) => new Option(id, id, false, id === state.replica)));
  picker.onchange = () => showReplica(picker.value);
  byId("replica-picker").hidden = false;
}

function showReplica(replica) {
  state.replica = replica;
  state.lastId = null;
  forgetSteps();
  state.dirty = true;
  if (state.stream) state.stream.abort();  // streamSteps reconnects to the new one
}

// The live replicas again, after the one shown went away (Serve replaced it).
async function refreshReplicas() {
  const response = await fetch("/v1/engine/config", { headers: authHeaders() });
  if (!response.ok) return;
  const replicas = (await response.json()).replicas;
  state.replica = null;
  showReplicas(replicas);
  showReplica(state.replica);
}

async function streamSteps() {
  for (;;) {
    try {
      const headers = authHeaders();
      if (state.lastId !== null) headers["Last-Event-ID"] = String(state.lastId);
      const query = state.replica ? `?replica=${encodeURIComponent(state.replica)}` : "";
      state.stream = new AbortController();
      const response = await fetch(`/v1/engine/steps${query}`, { headers, signal: state.stream.signal });
      if (response.status === 401) {
        sessionStorage.removeItem(KEY_STORAGE);
        askForKey("that key was refused");
        return;
      }
      if (response.status === 404 && state.replica) {  // that replica is gone
        await refreshReplicas();
        continue;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setStatus("live", true);
      await readEvents(response.body, onStep);
      setStatus("reconnecting");
    } catch (error) {
      if (error.name === "AbortError") continue;  // another replica was picked: connect to it now
      setStatus(`reconnecting (${error.message})`);
    }
    await sleep(RETRY_MS);
  }
}

// Server-sent events by hand: EventSource cannot send the Authorization header.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6));
      if (data.length) onEvent(JSON.parse(data.join("\n")));
    }
  }
}

function onStep(step) {
  if (state.lastId !== null && step.step <= state.lastId) forgetSteps();  // a restarted server counts from 0
  state.lastId = step.step;
  state.steps.push(step);
  if (state.steps.length > state.config.timeline.steps) state.steps.shift();
  for (const update of step.updates) {
    if (update.finished !== null) {
      state.requests.delete(update.id);
      state.finished.unshift(update);
    } else {
      state.requests.set(update.id, update);
    }
  }
  state.finished.length = Math.min(state.finished.length, FINISHED_KEPT);
  state.dirty = true;
}

function forgetSteps() {
  state.steps = [];
  state.requests.clear();
  state.finished = [];
}

// Requests that left the window without a finishing update (aborted before their first token, say).
function forgetRequestsOutsideWindow() {
  const inWindow = new Set(state.steps.flatMap((step) => step.cells.map(([id]) => id)));
  for (const id of state.requests.keys()) if (!inWindow.has(id)) state.requests.delete(id);
}

// ---- drawing ------------------------------------------------------------------------------------

function renderLoop() {
  if (state.dirty && state.steps.length) {
    state.dirty = false;
    render();
  }
  requestAnimationFrame(renderLoop);
}

function render() {
  const latest = state.steps[state.steps.length - 1];
  byId("step-count").textContent = latest.step + 1;  // step indices count non-empty steps from 0
  byId("running").textContent = latest.running;
  byId("waiting").textContent = latest.waiting;
  for (const name of ["used", "cached", "free", "total"]) byId(`kv-${name}`).textContent = latest.kv[name];
  byId("kv-usage").textContent = (100 * latest.kv.used / Math.max(1, latest.kv.total)).toFixed(1);
  drawTimeline(byId("timeline"), state.steps, state.config.timeline);
  const engine = state.config.engine;
  drawChart("kv-chart", [
    { label: "used", color: "#59a14f", value: (s) => s.kv.used },
    { label: "cached", color: "#edc948", value: (s) => s.kv.cached },
    { label: "free", color: "#e6e6e6", value: (s) => s.kv.free },
  ], { stacked: true });
  drawChart("queue-chart", [
    { label: "running", color: "#4e79a7", value: (s) => s.running },
    { label: "waiting", color: "#e15759", value: (s) => s.waiting },
  ], {});
  drawChart("time-chart", [
    { label: "forward", color: "#4e79a7", value: (s) => 1000 * s.forward },
    { label: "sampling", color: "#f28e2b", value: (s) => 1000 * s.sample },
    { label: "overhead", color: "#bab0ac", value: (s) => 1000 * s.overhead },
  ], { stacked: true });
  drawChart("tokens-chart", [
    { label: "prompt (prefill)", color: "#f28e2b", value: (s) => s.prompt_tokens },
    { label: "decode", color: "#4e79a7", value: (s) => s.tokens - s.prompt_tokens },
  ], { stacked: true, limit: engine.max_num_batched_tokens });
  drawChart("requests-chart", [
    { label: "prefilling", color: "#f28e2b", value: (s) => countCells(s, "prefill") },
    { label: "decoding", color: "#4e79a7", value: (s) => countCells(s, "decode") },
  ], { stacked: true, limit: engine.max_num_seqs });
  forgetRequestsOutsideWindow();
  showRunning(latest);
  showFinished();
}

function countCells(step, kindName) {
  const code = state.config.timeline.kinds.find((kind) => kind.name === kindName).code;
  return step.cells.filter(([, kind]) => kind === code).length;
}

// Fits the canvas's pixels to its on-screen size; returns the drawing context in CSS pixels.
function context2d(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, width, height };
}

// The same picture as the benchmark timeline (conveyor.engine.timeline): rows in order of first
// appearance, newest step at the right edge; a dark tick marks the step a request finished in.
function drawTimeline(canvas, steps, timeline) {
  const { ctx, width, height } = context2d(canvas);
  const rows = new Map();
  for (const step of steps) for (const [id] of step.cells) if (!rows.has(id)) rows.set(id, rows.size);
  const colors = new Map(timeline.kinds.map((kind) => [kind.code, kind.color]));
  const columnWidth = width / timeline.steps;
  const rowHeight = Math.min(12, height / Math.max(1, rows.size));
  const left = width - steps.length * columnWidth;
  steps.forEach((step, column) => {
    const x = left + column * columnWidth;
    for (const [id, kind] of step.cells) {
      ctx.fillStyle = colors.get(kind);
      ctx.fillRect(x, rows.get(id) * rowHeight, Math.max(1, columnWidth - 0.5), Math.max(1, rowHeight - 1));
    }
    ctx.fillStyle = "#222";
    for (const id of step.finished) ctx.fillRect(x + columnWidth - 1.5, rows.get(id) * rowHeight, 1.5, rowHeight);
  });
  ctx.fillStyle = "#666";
  ctx.fillText(`step ${steps[steps.length - 1].step}`, width - 60, height - 4);
  legend("timeline-legend", timeline.kinds.map((kind) => ({ label: kind.label, color: kind.color })));
}

// One column per step, aligned with the timeline's: stacked bars, or one line per series; `limit` is a
// dashed line.
function drawChart(canvasId, series, { stacked = false, limit = null }) {
  const { ctx, width, height } = context2d(byId(canvasId));
  const steps = state.steps;
  const columnWidth = width / state.config.timeline.steps;
  const left = width - steps.length * columnWidth;
  const totals = steps.map((s) => stacked ? series.reduce((sum, line) => sum + line.value(s), 0)
                                          : Math.max(...series.map((line) => line.value(s))));
  const top = Math.max(limit ?? 0, ...totals, 1e-9) * 1.1;
  const y = (value) => height - 12 - (height - 16) * value / top;
  if (stacked) {
    steps.forEach((step, column) => {
      let base = 0;
      for (const line of series) {
        const value = line.value(step);
        ctx.fillStyle = line.color;
        ctx.fillRect(left + column * columnWidth, y(base + value), columnWidth, y(base) - y(base + value));
        base += value;
      }
    });
  } else {
    ctx.lineWidth = 1.5;
    for (const line of series) {  // a step line through the middle of each step's column
      ctx.strokeStyle = line.color;
      ctx.beginPath();
      steps.forEach((step, column) => {
        const x = left + column * columnWidth, level = y(line.value(step));
        if (column === 0) ctx.moveTo(x, level);
        else ctx.lineTo(x, level);
        ctx.lineTo(x + columnWidth, level);
      });
      ctx.stroke();
    }
  }
  ctx.fillStyle = "#666";
  ctx.fillText(formatNumber(top / 1.1), 2, 10);
  if (limit !== null) {
    ctx.strokeStyle = "#222";
    ctx.lineWidth = 1;
    ctx.setLineDash([4, 3]);
    ctx.beginPath();
    ctx.moveTo(0, y(limit));
    ctx.lineTo(width, y(limit));
    ctx.stroke();
    ctx.setLineDash([]);
  }
  legend(canvasId.replace("chart", "legend"), series);
}

function legend(elementId, entries) {
  const element = byId(elementId);
  if (element.childElementCount) return;  // drawn once: the entries never change
  for (const { label, color } of entries) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = color;
    item.append(swatch, label);
    element.append(item);
  }
}

// ---- tables -------------------------------------------------------------------------------------

const seconds = (value) => value === null || value === undefined ? "…" : value.toFixed(2);
const formatNumber = (value) => value >= 100 ? value.toFixed(0) : value.toPrecision(2);

function fillTable(tableId, rows) {
  const body = byId(tableId).tBodies[0];
  body.replaceChildren(...rows.map(({ id, cells }) => {
    const row = document.createElement("tr");
    row.dataset.requestId = id;
    for (const text of [id, ...cells]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }));
}

function showRunning(latest) {
  const finished = new Set(latest.finished);
  const names = new Map(state.config.timeline.kinds.map((kind) => [kind.code, kind.name]));
  const running = latest.cells.filter(([id, kind]) => !finished.has(id) && names.get(kind) !== "preempted");
  fillTable("running-table", running.map(([id, kind]) => {
    const update = state.requests.get(id);  // none yet while its prompt is still being prefilled
    return {
      id, cells: [names.get(kind), update?.prompt_tokens ?? "…", update?.generated_tokens ?? 0,
        update?.cached_tokens ?? 0, seconds(update ? latest.time - update.arrival : null),
        seconds(update?.first_token ? update.first_token - update.arrival : null), update?.preemptions ?? 0],
    };
  }));
}

function showFinished() {
  fillTable("finished-table", state.finished.map((r) => {
    const decodeTime = r.first_token === null ? null : r.finished - r.first_token;
    const meanItl = decodeTime === null || r.generated_tokens < 2 ? "…"
      : (1000 * decodeTime / (r.generated_tokens - 1)).toFixed(1);
    return {
      id: r.id, cells: [r.finish_reason, r.prompt_tokens, r.generated_tokens, r.cached_tokens,
        seconds(r.first_token === null ? null : r.first_token - r.arrival), meanItl,
        seconds(r.finished - r.arrival), r.preemptions],
    };
  }));
}

function showConfig(config) {
  byId("model").textContent = `${config.model} (${config.model_config.architecture})`;
  byId("window").textContent = `${config.timeline.steps} steps`;
  const entries = { model: config.model, "model path": config.model_path, ...config.model_config, ...config.engine };
  byId("config").replaceChildren(...Object.entries(entries).flatMap(([name, value]) => {
    const term = document.createElement("dt");
    const description = document.createElement("dd");
    term.textContent = name;
    description.textContent = value === null ? "—" : String(value);
    return [term, description];
  }));
}

start().catch((error) => setStatus(`failed: ${error.message}`));
