// The dashboard page: polls the server's JSON API every second and draws plain SVG charts.
// No library and nothing fetched from elsewhere: the page works offline next to the pipeline.
"use strict";

const POLL_MS = 1000;
const USER_POLL_MS = 2000;
const COLORS = {
  model: "#2563eb", base: "#8a94a6", log: "#2563eb", recs: "#16a34a", dlq: "#dc2626",
  router: "#ea580c", workers: "#7c3aed", grid: "#e3e6ec", axis: "#6b7385", marker: "#b45309",
};
const $ = (id) => document.getElementById(id);
let updates = 0;
let selectedUser = null;
let lastOk = 0;

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}
function fmt(x, digits = 3) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
function count(x) { return x === null || x === undefined ? "–" : Math.round(x).toLocaleString("en"); }
function clock(t) { return new Date(t * 1000).toTimeString().slice(0, 8); }
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// A line chart: series [{label, color, x, y, dash}], x in epoch seconds (or any number).
function lineChart(el, opts) {
  const width = el.clientWidth || 600, height = el.clientHeight || 200;
  const m = { l: 46, r: 10, t: 20, b: 22 };
  const w = width - m.l - m.r, h = height - m.t - m.b;
  const xs = opts.series.flatMap((s) => s.x);
  if (!xs.length) {
    el.innerHTML = `<svg width="${width}" height="${height}"><text x="${width / 2}" y="${height / 2}"
      text-anchor="middle" fill="${COLORS.axis}">${esc(opts.empty || "waiting for data…")}</text></svg>`;
    return;
  }
  const [x0, x1] = opts.xDomain || [Math.min(...xs), Math.max(...xs)];
  const ys = opts.series.flatMap((s) => s.y.filter((v) => v !== null));
  const y0 = opts.yMin ?? 0;
  const y1 = opts.yMax ?? niceMax(Math.max(...ys, 0) * 1.1);
  const sx = (x) => m.l + (x1 > x0 ? ((x - x0) / (x1 - x0)) * w : w / 2);
  const sy = (y) => m.t + h - ((y - y0) / (y1 - y0 || 1)) * h;
  const parts = [];
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4, y = sy(v);
    parts.push(`<line x1="${m.l}" x2="${m.l + w}" y1="${y}" y2="${y}" stroke="${COLORS.grid}"/>`,
      `<text x="${m.l - 5}" y="${y + 4}" text-anchor="end" font-size="10" fill="${COLORS.axis}">${
        esc((opts.yFormat || ((v) => count(v)))(v))}</text>`);
  }
  const ticks = opts.xTicks || 5;
  for (let i = 0; i <= ticks; i++) {
    const v = x0 + ((x1 - x0) * i) / ticks;
    const anchor = i === 0 ? "start" : i === ticks ? "end" : "middle";
    parts.push(`<text x="${sx(v)}" y="${height - 6}" text-anchor="${anchor}" font-size="10"
      fill="${COLORS.axis}">${esc((opts.xFormat || clock)(v))}</text>`);
  }
  for (const mk of opts.markers || []) {
    if (mk.x < x0 || mk.x > x1) continue;
    const x = sx(mk.x);
    parts.push(`<line x1="${x}" x2="${x}" y1="${m.t}" y2="${m.t + h}" stroke="${COLORS.marker}"
      stroke-dasharray="4 3"/><text x="${x + 3}" y="${m.t + 10}" font-size="10"
      fill="${COLORS.marker}">${esc(mk.label)}</text>`);
  }
  for (const s of opts.series) {
    let d = "", pen = false;
    s.x.forEach((x, i) => {
      const y = s.y[i];
      if (y === null || y === undefined || x < x0) { pen = false; return; }
      d += `${pen ? "L" : "M"}${sx(x).toFixed(1)},${sy(Math.min(y, y1)).toFixed(1)}`;
      pen = true;
    });
    parts.push(`<path class="series" data-label="${esc(s.label)}" d="${d}" fill="none"
      stroke="${s.color}" stroke-width="${s.width || 1.8}" ${s.dash ? `stroke-dasharray="${s.dash}"` : ""}/>`);
  }
  let lx = m.l;
  for (const s of opts.series) {
    const last = [...s.y].reverse().find((v) => v !== null && v !== undefined);
    const text = `${s.label}${last !== undefined ? ": " + (opts.legendFormat || count)(last) : ""}`;
    parts.push(`<line x1="${lx}" x2="${lx + 16}" y1="9" y2="9" stroke="${s.color}" stroke-width="2"
      ${s.dash ? `stroke-dasharray="${s.dash}"` : ""}/><text x="${lx + 20}" y="13" font-size="11"
      fill="#1d2330">${esc(text)}</text>`);
    lx += 30 + text.length * 6.2;
  }
  el.innerHTML = `<svg width="${width}" height="${height}">${parts.join("")}</svg>`;
}

function renderOverview(o) {
  const tp = o.throughput, q = o.quality, lag = o.lag, models = o.models;
  const domain = tp.t.length ? [tp.t[0], tp.t[tp.t.length - 1]] : null;
  const markers = models.switches.map((s, i) => ({ x: s.t, label: i === 0 ? s.version : `→ ${s.version}` }));
  const meta = o.pipeline || {};
  $("pipeline").textContent = `${meta.bootstrap || ""}${meta.prefix ? " · prefix " + meta.prefix : ""}`;
  $("kpi-log").textContent = count(o.totals.log);
  $("kpi-recs").textContent = count(o.totals.recommendations);
  const recent = (series) => {
    const tail = series.slice(-11, -1);  // the last complete seconds
    return tail.length ? tail.reduce((a, b) => a + b, 0) / tail.length : 0;
  };
  $("kpi-log-rate").textContent = `${fmt(recent(tp.log), 1)} /s lately`;
  $("kpi-recs-rate").textContent = `${fmt(recent(tp.recs), 1)} /s lately · ${count(o.totals.users)} users`;
  const last = (a) => (a.length ? a[a.length - 1] : null);
  $("kpi-mrr").textContent = `${fmt(last(q.model_mrr))} / ${fmt(last(q.baseline_mrr))}`;
  $("kpi-recall").textContent = `${fmt(last(q.model_recall))} / ${fmt(last(q.baseline_recall))}`;
  $("kpi-mrr-sub").textContent = `all ${count(q.total.events)} evaluated: ${fmt(q.total.model_mrr)} / ${fmt(q.total.baseline_mrr)}`;
  $("kpi-recall-sub").textContent = `all: ${fmt(q.total.model_recall)} / ${fmt(q.total.baseline_recall)}`;
  const workerLag = last(lag.workers.filter((v) => v !== null));
  $("kpi-lag").textContent = count(workerLag);
  $("kpi-lag-sub").textContent = lag.error ? "lag unavailable" : `router ${count(last(lag.router.filter((v) => v !== null)))}`;
  $("kpi-dlq").textContent = count(o.totals.dlq);
  const reasons = Object.entries(o.dlq.by_reason);
  $("kpi-dlq-sub").textContent = reasons.length ? reasons.slice(0, 2).map(([r, n]) => `${r} ${n}`).join(" · ") : "none";
  $("kpi-model").textContent = models.serving ? models.serving.version : (last(models.switches) || {}).version || "–";
  $("kpi-model-sub").textContent = `${models.switches.length ? models.switches.length - 1 : 0} switches · ${models.versions.length} announced`;

  lineChart($("chart-throughput"), {
    xDomain: domain, markers, legendFormat: (v) => fmt(v, 0),
    series: [
      { label: "sequenced", color: COLORS.log, x: tp.t, y: tp.log },
      { label: "recommended", color: COLORS.recs, x: tp.t, y: tp.recs },
      { label: "rejected", color: COLORS.dlq, x: tp.t, y: tp.dlq, width: 1.2 },
    ],
  });
  lineChart($("chart-lag"), {
    xDomain: domain, markers,
    series: [
      { label: "router", color: COLORS.router, x: lag.t, y: lag.router },
      { label: "workers", color: COLORS.workers, x: lag.t, y: lag.workers },
    ],
    empty: lag.error ? `lag unavailable: ${lag.error}` : "waiting for data…",
  });
  $("quality-window").textContent = `over the latest ${q.window} evaluated events`;
  const quality = (key, label) => lineChart($(`chart-${key}`), {
    xDomain: domain, markers, yMin: 0, yMax: 1, yFormat: (v) => fmt(v, 2), legendFormat: (v) => fmt(v),
    empty: "no evaluated events yet",
    series: [
      { label: `model ${label}`, color: COLORS.model, x: q.t, y: q[`model_${key}`] },
      { label: `recency baseline`, color: COLORS.base, x: q.t, y: q[`baseline_${key}`], dash: "5 3" },
    ],
  });
  quality("mrr", "MRR");
  quality("recall", "Recall@10");
  const s = o.served;
  $("served-note").textContent = s.events
    ? `Served lists (what users were sent after their previous event, ${count(s.events)} events): ` +
      `Recall@${q.k} ${fmt(s.model.recall)} against ${fmt(s.heuristic.recall)} for the recent-then-popular ` +
      `list, MRR ${fmt(s.model.mrr)} against ${fmt(s.heuristic.mrr)}.` +
      (q.model_only ? ` ${count(q.model_only)} evaluations came before the log this page read.` : "")
    : "Served lists: none measured yet (a user needs two events).";

  const byVersion = models.recommendations_by_version;
  const serving = models.serving ? models.serving.version : null;
  const rows = models.versions.length
    ? models.versions
    : Object.keys(byVersion).map((v) => ({ version: v, created_at: null, log_seq: null, metrics: {} }));
  $("models").querySelector("tbody").innerHTML = rows.map((v) => {
    const metric = v.metrics.valid_mrr_frozen ?? null;
    return `<tr class="${v.version === serving ? "serving" : ""}"><td>${esc(v.version)}</td>
      <td>${v.created_at ? clock(v.created_at) : "–"}</td>
      <td class="num">${v.log_seq === null || v.log_seq < 0 ? "from a file" : count(v.log_seq)}</td>
      <td class="num">${fmt(metric)}</td><td class="num">${count(byVersion[v.version] || 0)}</td></tr>`;
  }).join("") || `<tr><td colspan="5" class="muted">no model seen yet</td></tr>`;
  $("switches").innerHTML = models.switches.map((sw, i) =>
    `<li>${clock(sw.t)} · <b>${esc(sw.version)}</b> serves from event seq ${count(sw.since_seq)}${
      i === 0 ? " (first epoch this page saw)" : ""}</li>`).join("") +
    models.promotions.map((p) => `<li class="muted">${clock(p.t)} · promoted ${esc(p.version)}${
      p.previous ? ` (was ${esc(p.previous)})` : ""}</li>`).join("") ||
    `<li class="muted">no switch seen (workers serving one checkpoint stamp no epochs)</li>`;

  const maxN = Math.max(1, ...reasons.map(([, n]) => n));
  $("dlq-bars").innerHTML = reasons.map(([r, n]) => `<div class="bar"><span class="name">${esc(r)}</span>
    <span class="fill" style="width:${Math.max(2, (260 * n) / maxN)}px"></span><span class="n">${count(n)}</span></div>`)
    .join("") || `<p class="muted">no rejected event</p>`;
  $("dlq-recent").querySelector("tbody").innerHTML = o.dlq.recent.slice(0, 6).map((d) =>
    `<tr><td>${clock(d.t)}</td><td>${esc(d.reason)}</td><td>${esc(d.detail)}</td></tr>`).join("");
  $("workers").innerHTML = o.workers.length ? "<h3>Workers</h3>" + o.workers.map((w, i) => w.answered
    ? `<div>worker ${i}: ${count(w.events)} events · ${fmt(w.events_per_s, 1)}/s · lag ${count(w.lag)}${
      w.model_version ? ` · ${esc(w.model_version)}` : ""}${w.mrr !== null ? ` · MRR ${fmt(w.mrr)}` : ""}</div>`
    : `<div class="muted">worker ${i}: no answer on port ${w.port}</div>`).join("") : "";

  $("active-users").innerHTML = o.active_users.map((u) =>
    `<span class="chip" data-user="${esc(u)}">${esc(u)}</span>`).join("");
}

async function poll() {
  try {
    const response = await fetch("/api/overview", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    renderOverview(await response.json());
    updates += 1;
    lastOk = Date.now();
    document.body.dataset.updates = String(updates);
    $("status").className = "status ok";
    $("status").textContent = `updated ${new Date().toTimeString().slice(0, 8)}`;
  } catch (err) {
    $("status").className = "status stale";
    $("status").textContent = `dashboard server not answering (${err.message})`;
  }
}

function trajectoryChart(el, traj) {
  const width = el.clientWidth || 400, height = el.clientHeight || 320;
  const pts = traj.points;
  if (!pts.length) { el.innerHTML = `<p class="muted">no recommendation for this user yet</p>`; return; }
  const m = { l: 40, r: 12, t: 12, b: 30 };
  const w = width - m.l - m.r, h = height - m.t - m.b;
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
  const pad = (lo, hi) => { const d = (hi - lo) || 1; return [lo - 0.08 * d, hi + 0.08 * d]; };
  const [x0, x1] = pad(Math.min(...xs), Math.max(...xs)), [y0, y1] = pad(Math.min(...ys), Math.max(...ys));
  const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * w, sy = (y) => m.t + h - ((y - y0) / (y1 - y0)) * h;
  const parts = [`<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6"
    markerHeight="6" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="${COLORS.model}"/></marker></defs>`,
    `<rect x="${m.l}" y="${m.t}" width="${w}" height="${h}" fill="none" stroke="${COLORS.grid}"/>`];
  const n = pts.length;
  for (let i = 1; i < n; i++) {
    const a = pts[i - 1], b = pts[i], shade = 0.25 + (0.75 * i) / (n - 1);
    parts.push(`<line x1="${sx(a.x)}" y1="${sy(a.y)}" x2="${sx(b.x)}" y2="${sy(b.y)}" stroke="${COLORS.model}"
      stroke-opacity="${shade.toFixed(2)}" stroke-width="1.6" marker-end="url(#arrow)"/>`);
  }
  pts.forEach((p, i) => {
    const shade = n > 1 ? 0.25 + (0.75 * i) / (n - 1) : 1;
    parts.push(`<circle cx="${sx(p.x)}" cy="${sy(p.y)}" r="3" fill="${COLORS.model}" fill-opacity="${
      shade.toFixed(2)}"><title>${esc(`${i + 1}/${n} · item ${p.item_id} · t=${p.timestamp}`)}</title></circle>`);
    if (n <= 24) {  // the order of the events, where it stays readable
      parts.push(`<text x="${sx(p.x) + 5}" y="${sy(p.y) - 4}" font-size="9" fill="${COLORS.axis}">${i + 1}</text>`);
    }
  });
  const first = pts[0], lastP = pts[n - 1];
  const label = (p, text, color, dy) => {  // on the side of the point with room for it
    const right = sx(p.x) < m.l + w * 0.6;
    return `<text x="${sx(p.x) + (right ? 9 : -9)}" y="${sy(p.y) + dy}" font-size="11" font-weight="600"
      text-anchor="${right ? "start" : "end"}" fill="${color}">${esc(text)}</text>`;
  };
  parts.push(`<circle cx="${sx(first.x)}" cy="${sy(first.y)}" r="6" fill="#fff" stroke="${COLORS.model}" stroke-width="2"/>`,
    label(first, "first", COLORS.axis, -8),
    `<circle cx="${sx(lastP.x)}" cy="${sy(lastP.y)}" r="6" fill="${COLORS.dlq}"/>`,
    label(lastP, `latest (item ${lastP.item_id})`, COLORS.dlq, 16));
  const ex = traj.plane ? traj.plane.explained : [0, 0];
  parts.push(`<text x="${m.l + w / 2}" y="${height - 8}" text-anchor="middle" font-size="11" fill="${COLORS.axis}">PC 1 (${(100 * ex[0]).toFixed(0)} % of variance)</text>`,
    `<text transform="translate(12 ${m.t + h / 2}) rotate(-90)" text-anchor="middle" font-size="11" fill="${COLORS.axis}">PC 2 (${(100 * ex[1]).toFixed(0)} %)</text>`);
  el.innerHTML = `<svg width="${width}" height="${height}">${parts.join("")}</svg>`;
}

function renderUser(u) {
  $("user-view").hidden = false;
  $("user-error").textContent = "";
  const latest = u.latest;
  $("user-title").innerHTML = `user <span id="user-id">${esc(u.user_id)}</span> <span class="muted">· ${
    count(u.events)} events read · last ${clock(u.last_seen)}${latest ? ` · list after item ${esc(latest.item_id)} by ${
    esc(latest.model_version)}` : ""}${latest && latest.state_change_probability !== null ? ` · p(state change) ${
    fmt(latest.state_change_probability)}` : ""}</span>`;
  const recent = new Set(u.recent_items.map((r) => r.item_id));
  $("user-recs").querySelector("tbody").innerHTML = latest ? latest.candidates.map((c) =>
    `<tr class="${recent.has(c.item_id) ? "hit" : ""}"><td>${c.rank}</td><td class="item">${esc(c.item_id)}</td>
    <td class="num">${fmt(c.score)}</td><td class="num">${fmt(c.below_top)}</td><td class="num">${fmt(c.distance, 2)}</td>
    <td>${c.recent_position ? `<span class="tag">#${c.recent_position}</span>` : ""}</td><td class="num">${count(c.events)}</td></tr>`)
    .join("") : `<tr><td colspan="7" class="muted">no recommendation yet</td></tr>`;
  $("user-recent").innerHTML = u.recent_items.map((r) =>
    `<li>item <b>${esc(r.item_id)}</b> <span class="muted">t=${fmt(r.timestamp, 0)} · seq ${count(r.seq)}</span></li>`).join("");
  $("user-evals").querySelector("tbody").innerHTML = u.evaluations.map((e) =>
    `<tr><td>${esc(e.item_id)}</td><td class="num">${count(e.rank)}</td><td class="num">${count(e.baseline_rank)}</td>
    <td class="num">${count(e.n_items)}</td></tr>`).join("") || `<tr><td colspan="4" class="muted">none of this user's events was evaluated</td></tr>`;
  trajectoryChart($("user-trajectory"), u.trajectory);
  const t = u.trajectory;
  $("trajectory-note").textContent = t.points.length
    ? `The user's projected embedding carried by each of their last ${t.points.length} recommendations (by ${
      t.version}), light to dark in time. The plane is a fixed PCA: the first two principal axes of the first ${
      count(t.plane.fitted_on)} user vectors this page received from ${t.version}${t.plane.fixed ? "" : " (provisional until 512)"}, ` +
      `so positions stay comparable across users and over time.${t.hidden ? ` ${t.hidden} earlier points by another version are not drawn (another embedding space).` : ""}`
    : "";
}

async function showUser(id, quiet) {
  if (!id) return;
  selectedUser = id;
  if (!quiet) location.hash = `user=${encodeURIComponent(id)}`;
  try {
    const response = await fetch(`/api/user?id=${encodeURIComponent(id)}`, { cache: "no-store" });
    const body = await response.json();
    if (selectedUser !== id) return;
    if (!response.ok) {
      $("user-view").hidden = true;
      $("user-error").textContent = `${body.error}${body.similar && body.similar.length ? ` — seen: ${body.similar.join(", ")}` : ""}`;
      return;
    }
    renderUser(body);
  } catch (err) {
    $("user-error").textContent = `no answer (${err.message})`;
  }
}

$("user-form").addEventListener("submit", (e) => { e.preventDefault(); showUser($("user-search").value.trim()); });
$("active-users").addEventListener("click", (e) => {
  const user = e.target.dataset && e.target.dataset.user;
  if (user) { $("user-search").value = user; showUser(user); }
});
poll();
setInterval(poll, POLL_MS);
setInterval(() => { if (selectedUser) showUser(selectedUser, true); }, USER_POLL_MS);
const fromHash = /user=([^&]+)/.exec(location.hash);
if (fromHash) { $("user-search").value = decodeURIComponent(fromHash[1]); showUser($("user-search").value, true); }
