// The Keel console: sign in, watch a live stream, see the projections' status and lag.
// Streams are read with fetch (EventSource cannot send an Authorization header) and resumed
// with Last-Event-ID after every disconnect, so no event is missed or shown twice.
"use strict";

const MAX_ROWS = 500;
const $ = (id) => document.getElementById(id);

const session = { access: null, refresh: null, email: null, refreshTimer: null };
let watch = null; // { controller, lastId, count }
let statusTimer = null;

function say(text) { $("message").textContent = text || ""; }

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (session.access) headers.Authorization = `Bearer ${session.access}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = new Error((json && (json.detail || json.title)) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return json;
}

function signedIn(tokens, email) {
  session.access = tokens.access_token;
  session.refresh = tokens.refresh_token;
  if (email) session.email = email;
  clearTimeout(session.refreshTimer);
  // Refresh a little before the access token expires.
  session.refreshTimer = setTimeout(refresh, Math.max(5, tokens.expires_in - 30) * 1000);
  $("login").hidden = true;
  $("who").hidden = false;
  $("who-email").textContent = session.email;
}

async function refresh() {
  try {
    signedIn(await api("POST", "/v1/auth/refresh", { refresh_token: session.refresh }));
  } catch (error) {
    say(`Signed out: ${error.message}`);
    signOut();
  }
}

function signOut() {
  clearTimeout(session.refreshTimer);
  Object.assign(session, { access: null, refresh: null, email: null });
  stop();
  $("login").hidden = false;
  $("who").hidden = true;
  $("projection-rows").innerHTML = '<tr><td colspan="5">sign in as an operator to see the projections</td></tr>';
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  say("");
  const email = $("email").value;
  try {
    signedIn(await api("POST", "/v1/auth/login", { email, password: $("password").value }), email);
    $("password").value = "";
    pollStatus();
  } catch (error) {
    say(`Sign-in failed: ${error.message}`);
  }
});

$("logout").addEventListener("click", async () => {
  try { await api("POST", "/v1/auth/logout", {}); } catch (_) { /* the session ends here either way */ }
  signOut();
});

// ---- the live stream ----

function streamUrl() {
  const alias = $("alias").value;
  const aggregate = $("aggregate").value.trim();
  const params = new URLSearchParams({ from: $("from").value });
  const types = $("types").value.split(",").map((t) => t.trim()).filter(Boolean);
  if (types.length) params.set("type", types.join(","));
  return `/v1/streams/${encodeURIComponent(alias)}${aggregate ? `/${encodeURIComponent(aggregate)}` : ""}?${params}`;
}

function setState(text) { $("state").textContent = text; }

$("subscribe").addEventListener("submit", (event) => {
  event.preventDefault();
  if (!session.access) { say("Sign in first."); return; }
  stop();
  say("");
  $("events").tBodies[0].replaceChildren();
  watch = { url: streamUrl(), lastId: null, count: 0, controller: null, stopped: false };
  $("count").textContent = "0";
  // Watching again (with other filters) replaces the current stream.
  $("disconnect").disabled = false;
  run(watch);
});

$("disconnect").addEventListener("click", stop);

function stop() {
  if (watch) {
    watch.stopped = true;
    if (watch.controller) watch.controller.abort();
  }
  watch = null;
  $("disconnect").disabled = true;
  setState("idle");
}

async function run(current) {
  let backoff = 500;
  while (!current.stopped) {
    current.controller = new AbortController();
    const headers = { Accept: "text/event-stream", Authorization: `Bearer ${session.access}` };
    if (current.lastId) headers["Last-Event-ID"] = current.lastId;
    let outcome;
    try {
      setState(current.lastId ? "resuming" : "connecting");
      const response = await fetch(current.url, { headers, signal: current.controller.signal });
      if (!response.ok) {
        const problem = await response.json().catch(() => ({}));
        if (response.status === 401 && session.refresh) { await refresh(); continue; }
        if (response.status < 500 && response.status !== 429) {
          say(`Cannot watch: ${problem.detail || problem.title || response.status}`);
          stop();
          return;
        }
        throw new Error(problem.detail || `HTTP ${response.status}`);
      }
      setState("live");
      backoff = 500;
      outcome = await read(response.body, current);
    } catch (error) {
      if (current.stopped) return;
      setState(`disconnected (${error.message}); retrying`);
    }
    if (current.stopped) return;
    // `lagged` and `end` carry the resume position: reconnect at once. Anything else: back off.
    if (outcome === "lagged" || outcome === "end") continue;
    await new Promise((resolve) => setTimeout(resolve, backoff));
    backoff = Math.min(backoff * 2, 10000);
  }
}

// Reads Server-Sent Events until the stream closes; returns the name of its final event.
async function read(body, current) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return last;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { name: "message", id: null, data: [] };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event.name = text;
        else if (field === "id") event.id = text;
        else if (field === "data") event.data.push(text);
      }
      if (event.id) current.lastId = event.id;
      if (!event.data.length) continue;
      const data = JSON.parse(event.data.join("\n"));
      if (event.name === "message") show(data, current);
      else { last = event.name; setState(`${event.name}: ${data.reason}`); }
    }
  }
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function show(event, current) {
  current.count += 1;
  $("count").textContent = String(current.count);
  const row = document.createElement("tr");
  row.dataset.type = event.event_type;
  row.append(
    cell(new Date(event.occurred_at).toLocaleTimeString()),
    cell(event.event_type, "type"),
    cell(event.aggregate_id),
    cell(String(event.aggregate_version)),
    cell(event.actor),
    cell(`${event.topic}/${event.partition}@${event.offset}`),
    cell(JSON.stringify(event.payload), "payload"),
  );
  const body = $("events").tBodies[0];
  body.prepend(row);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
}

// ---- projections ----

async function pollStatus() {
  clearTimeout(statusTimer);
  if (!session.access) return;
  const rows = $("projection-rows");
  try {
    const { items } = await api("GET", "/v1/projections");
    recordSample(items);
    drawCharts();
    rows.replaceChildren(...items.map((projection) => {
      const live = projection.versions.find((version) => version.version === projection.live_version);
      const building = projection.versions.filter((version) => version.version !== projection.live_version);
      const row = document.createElement("tr");
      row.dataset.projection = projection.name;
      const lag = live ? live.lag : null;
      row.append(
        cell(projection.name),
        cell(projection.live_version == null ? "—" : `v${projection.live_version}`),
        cell([live ? live.state : "none", ...building.map((version) => `v${version.version} ${version.state} (lag ${version.lag})`)].join(", ")
          + (projection.needs_rebuild ? " · needs rebuild" : "")),
        cell(lag == null ? "—" : String(lag), lag ? "lag lagging" : "lag"),
        cell(String(projection.unresolved_dead_letters), projection.unresolved_dead_letters ? "lagging" : ""),
      );
      return row;
    }));
  } catch (error) {
    const text = error.status === 403 ? "your account may not read the projections' status (projections:read)" : `unavailable: ${error.message}`;
    rows.innerHTML = "";
    const row = document.createElement("tr");
    const td = cell(text);
    td.colSpan = 5;
    row.append(td);
    rows.append(row);
    if (error.status === 403) return;
  }
  statusTimer = setTimeout(pollStatus, 2000);
}

// ---- charts: the last minutes of the status polls ----
//
// Each poll of /v1/projections is a sample: per topic, the high watermarks of its partitions
// (summed: every record the topic ever got), and per projection, the live version's lag. The
// commit rate of a topic is the growth of that sum between two samples.

const CHART_WINDOW_MS = 5 * 60 * 1000;
const CHART_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"];
const samples = [];

function recordSample(items) {
  const partitions = new Map();
  const lags = new Map();
  for (const projection of items) {
    const live = projection.versions.find((version) => version.version === projection.live_version);
    if (!live) continue;
    lags.set(projection.name, live.lag);
    for (const partition of live.partitions) {
      const key = `${partition.topic}\u0000${partition.partition}`;
      partitions.set(key, Math.max(partitions.get(key) ?? 0, partition.high_watermark));
    }
  }
  const highs = new Map();
  for (const [key, high] of partitions) {
    const topic = key.split("\u0000")[0];
    highs.set(topic, (highs.get(topic) ?? 0) + high);
  }
  const at = Date.now();
  samples.push({ at, highs, lags });
  while (samples.length && samples[0].at < at - CHART_WINDOW_MS) samples.shift();
}

function addPoint(series, name, at, value) {
  if (!series.has(name)) series.set(name, []);
  series.get(name).push([at, value]);
}

/** Commits per second of each topic, between consecutive samples. */
function rateSeries() {
  const series = new Map();
  for (let i = 1; i < samples.length; i++) {
    const [before, after] = [samples[i - 1], samples[i]];
    const seconds = (after.at - before.at) / 1000;
    for (const [topic, high] of after.highs) {
      const earlier = before.highs.get(topic);
      if (earlier !== undefined && seconds > 0) addPoint(series, topic, after.at, Math.max(0, high - earlier) / seconds);
    }
  }
  return series;
}

function lagSeries() {
  const series = new Map();
  for (const sample of samples) {
    for (const [projection, lag] of sample.lags) addPoint(series, projection, sample.at, lag);
  }
  return series;
}

const SVG = "http://www.w3.org/2000/svg";

/** One small line chart: a line per series over the window, the largest value on the axis. */
function drawChart(id, series, unit) {
  const svg = $(id);
  const [width, height] = [300, 90];
  // From the first sample (or five minutes ago, whichever is later) to now: a page open for a few
  // seconds fills the chart too.
  const now = Date.now();
  const start = Math.max(now - CHART_WINDOW_MS, samples.length ? samples[0].at : now);
  const span = Math.max(now - start, 1);
  const top = Math.max(1, ...[...series.values()].flat().map(([, value]) => value));
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const axis = document.createElementNS(SVG, "text");
  axis.setAttribute("x", "2");
  axis.setAttribute("y", "10");
  axis.setAttribute("class", "axis");
  axis.textContent = `${formatValue(top)} ${unit}`;
  svg.append(axis);
  const legend = $(`${id}-legend`);
  legend.replaceChildren();
  [...series.keys()].sort().forEach((name, index) => {
    const points = series.get(name);
    const color = CHART_COLORS[index % CHART_COLORS.length];
    const coordinates = points.map(([at, value]) => [
      ((at - start) / span) * width,
      height - 2 - (value / top) * (height - 14),
    ]);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", coordinates.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
    line.setAttribute("stroke", color);
    line.dataset.series = name;
    line.dataset.points = String(points.length);
    line.dataset.max = String(Math.max(...points.map(([, value]) => value)));
    line.dataset.last = String(points[points.length - 1][1]);
    // The latest value as a dot: a series of one point is seen too.
    const [lastX, lastY] = coordinates[coordinates.length - 1];
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", lastX.toFixed(1));
    dot.setAttribute("cy", lastY.toFixed(1));
    dot.setAttribute("r", "2.5");
    dot.setAttribute("fill", color);
    svg.append(line, dot);
    const item = document.createElement("span");
    item.style.color = color;
    item.textContent = `${name} ${formatValue(points[points.length - 1][1])}`;
    legend.append(item);
  });
}

function formatValue(value) {
  return value >= 100 || Number.isInteger(value) ? String(Math.round(value)) : value.toFixed(1);
}

function drawCharts() {
  drawChart("chart-rates", rateSeries(), "commits/s");
  drawChart("chart-lag", lagSeries(), "records behind");
}
