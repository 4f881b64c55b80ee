// The operator console: a hash-routed single page over /api/v1, refreshed by server-sent events.
"use strict";

const API = "/api/v1";
const $ = (sel) => document.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)}%`);
const signed = (x, d = 3) => (x == null ? "–" : `${x >= 0 ? "+" : ""}${x.toFixed(d)}`);
const pill = (s) => `<span class="pill ${esc(s)}">${esc(String(s).replace(/_/g, " "))}</span>`;
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const interval = (d) => (d ? `[${signed(d.ci_low)}, ${signed(d.ci_high)}]` : "–");

async function get(path) {
  const r = await fetch(API + path);
  if (!r.ok) throw new Error((await r.json()).error || r.statusText);
  return r.json();
}

async function post(path, body) {
  const operator = $("#operator-name").value.trim();
  const token = $("#operator-token").value.trim();
  if (!operator || !token) { toast("Enter your operator name and token (top right) first.", true); throw new Error("no operator"); }
  sessionStorage.setItem("operator", operator);
  sessionStorage.setItem("token", token);
  const r = await fetch(API + path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({ operator, ...body }),
  });
  const data = await r.json();
  if (!r.ok) { toast(data.error || r.statusText, true); throw new Error(data.error); }
  return data;
}

function toast(text, error = false) {
  const t = $("#toast");
  t.textContent = text;
  t.className = `toast show${error ? " error" : ""}`;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.className = "toast"), 3500);
}

// -- shared fragments ---------------------------------------------------------------------------

function budgetBars(b) {
  const rows = [
    ["Rounds", b.spent.rounds, b.limits.rounds, ""],
    ["Evaluation episodes", b.spent.episodes, b.limits.episodes, ""],
    ["Wall time", b.spent.wall_time_s, b.limits.wall_time_s, " s"],
  ];
  return rows.map(([label, used, limit, unit]) => {
    const share = Math.min(1, used / limit);
    return `<div class="card"><div class="label">${label}</div>
      <div class="value">${Math.round(used).toLocaleString()}<span class="muted" style="font-size:14px"> / ${Math.round(limit).toLocaleString()}${unit}</span></div>
      <div class="bar ${share > 0.8 ? "hot" : ""}"><div style="width:${(100 * share).toFixed(1)}%"></div></div></div>`;
  }).join("");
}

function timeline(items) {
  if (!items.length) return `<div class="empty">No iterations yet. Start the loop from the Budget page or with <span class="mono">forgerl evolve start</span>.</div>`;
  return `<div class="timeline">${items.map((it) => `
    <div class="tl-item ${esc(it.state)}" data-iteration="${esc(it.id)}">
      <div class="tl-head"><span class="idx">#${it.index}</span>${pill(it.state)}
        <a href="#/iteration/${esc(it.id)}" class="mono">${esc(it.candidate || "(no candidate)")}</a>
        <span class="muted">from ${esc(it.base)}</span>
        <span class="muted" style="margin-left:auto">${when(it.updated_at)}</span></div>
      <div class="tl-body">${esc(it.rationale || "")}${it.decision ? ` · dev Δ <b class="${it.decision.mean_difference >= 0 ? "pos" : "neg"}">${signed(it.decision.mean_difference)}</b> ${interval(it.decision)}` : ""}</div>
    </div>`).join("")}</div>`;
}

function approvalControls(it) {
  if (it.state !== "awaiting_approval") return "";
  return `<div class="card section" id="approval-box"><h2>Operator approval</h2>
    <p class="muted">Dev and held-out agree on a gain. Promoting makes <span class="mono">${esc(it.candidate)}</span> the incumbent.</p>
    <div class="actions"><input id="approval-note" placeholder="note for the audit log (optional)">
      <button class="good" data-action="approve" data-id="${esc(it.id)}">Approve promotion</button>
      <button class="danger" data-action="reject" data-id="${esc(it.id)}">Reject</button></div></div>`;
}

// -- views --------------------------------------------------------------------------------------

const views = {
  async overview() {
    const [s, its, anomalies] = await Promise.all([get("/status"), get("/iterations"), get("/anomalies")]);
    const open = anomalies.filter((a) => a.status === "open");
    const promoted = its.filter((i) => i.state === "promoted").length;
    return `<h1>Overview</h1><div class="sub">Self-evolution of the agent scaffold on <b>${esc(s.suite)}</b>${s.halt_reason ? ` · ${esc(s.halt_reason)}` : ""}</div>
      <div class="grid cards">
        <div class="card"><div class="label">Loop</div><div class="value">${pill(s.status)}</div><div class="hint">approval gate ${s.require_approval ? "on" : "off"}</div></div>
        <div class="card"><div class="label">Incumbent</div><div class="value mono" style="font-size:17px">${esc(s.incumbent)}</div><div class="hint">${promoted} promotion(s)</div></div>
        <div class="card"><div class="label">Awaiting approval</div><div class="value">${s.awaiting_approval.length}</div><div class="hint"><a href="#/approvals">review</a></div></div>
        <div class="card"><div class="label">Open anomalies</div><div class="value">${open.length}</div><div class="hint"><a href="#/anomalies">diagnose</a></div></div>
      </div>
      <div class="grid cards section" style="grid-template-columns:repeat(3,minmax(0,1fr))">${budgetBars(s.budget)}</div>
      <div class="section"><h2>Recent iterations</h2>${timeline(its.slice(0, 8))}</div>`;
  },

  async iterations() {
    const its = await get("/iterations");
    return `<h1>Iterations</h1><div class="sub">Every round, newest first: proposal, staged evaluation, decision.</div>${timeline(its)}`;
  },

  async iteration(id) {
    const it = await get(`/iterations/${encodeURIComponent(id)}`);
    const d = it.stages.find((s) => s.name === "dev");
    const diff = it.diff.length ? it.diff.map((c) => `<div class="path">${esc(c.path)}</div>
        <div class="del">− ${esc(JSON.stringify(c.before))}</div><div class="add">+ ${esc(JSON.stringify(c.after))}</div>`).join("")
      : `<div class="path muted">no scaffold change (${esc(it.candidate ? "identical" : "refused before a candidate was made")})</div>`;
    const stages = it.stages.map((s) => `<tr><td>${esc(s.name)}</td><td class="num">${s.per_task.length}</td><td class="num">${s.seeds}</td>
        <td class="num">${pct(s.incumbent_rate)}</td><td class="num">${pct(s.candidate_rate)}</td>
        <td class="num ${s.decision.mean_difference >= 0 ? "pos" : "neg"}">${signed(s.decision.mean_difference)}</td>
        <td class="num">${interval(s.decision)}</td><td>${pill(s.decision.verdict)}</td></tr>`).join("");
    const tasks = (d || it.stages[it.stages.length - 1] || { per_task: [] }).per_task
      .slice().sort((a, b) => Math.abs(b.difference) - Math.abs(a.difference)).slice(0, 40)
      .map((t) => `<tr><td class="mono">${esc(t.task)}</td><td class="num">${pct(t.incumbent)}</td><td class="num">${pct(t.candidate)}</td>
        <td class="num ${t.difference > 0 ? "pos" : t.difference < 0 ? "neg" : ""}">${signed(t.difference, 2)}</td></tr>`).join("");
    return `<h1>Iteration #${it.index} <span id="iteration-state">${pill(it.state)}</span></h1>
      <div class="sub"><a href="#/iterations">Iterations</a> / ${esc(it.id)} · <a href="#/compare/${esc(it.id)}">compare view</a></div>
      ${approvalControls(it)}
      <div class="grid two section">
        <div class="card"><h2>Candidate</h2><div class="kv">
          <div>Candidate</div><div class="mono">${esc(it.candidate || "–")}</div><div>Parent</div><div class="mono">${esc(it.base)}</div>
          <div>Proposer</div><div>${esc(it.proposer)} · ${esc(it.operator)}</div><div>Started</div><div>${when(it.created_at)}</div>
          <div>Decided by</div><div>${esc(it.approved_by || (it.state === "awaiting_approval" ? "waiting" : "decision rule"))}${it.note ? ` — ${esc(it.note)}` : ""}</div></div></div>
        <div class="card"><h2>Rationale</h2><p>${esc(it.rationale || "–")}</p></div>
      </div>
      <div class="section"><h2>Diff against the parent</h2><div class="diff">${diff}</div></div>
      <div class="section"><h2>Staged evaluation</h2>${it.stages.length ? `<div class="table-wrap"><table><thead><tr><th>stage</th><th class="num">tasks</th><th class="num">seeds</th><th class="num">incumbent</th><th class="num">candidate</th><th class="num">mean Δ</th><th class="num">95% interval</th><th>verdict</th></tr></thead><tbody>${stages}</tbody></table></div>` : `<div class="empty">Not evaluated.</div>`}</div>
      ${tasks ? `<div class="section"><h2>Per-task results <span class="muted">(dev split, largest differences first)</span></h2><div class="table-wrap"><table><thead><tr><th>task</th><th class="num">incumbent</th><th class="num">candidate</th><th class="num">Δ</th></tr></thead><tbody>${tasks}</tbody></table></div></div>` : ""}
      <div class="section"><h2>Logs</h2><pre class="logs">${esc(it.logs.join("\n"))}</pre></div>`;
  },

  async compare(id) {
    const it = await get(`/iterations/${encodeURIComponent(id)}`);
    if (!it.stages.length) return `<h1>Compare</h1><div class="empty">Iteration #${it.index} was not evaluated.</div>`;
    return `<h1>Compare: <span class="mono">${esc(it.candidate)}</span> vs <span class="mono">${esc(it.base)}</span></h1>
      <div class="sub"><a href="#/iteration/${esc(it.id)}">Iteration #${it.index}</a> · paired per-task differences (candidate − incumbent), averaged over seeds, with a bootstrap interval</div>
      <div class="card"><h2>Intervals by stage</h2>${forest(it.stages)}</div>
      <div class="grid two section">${it.stages.map((s) => `<div class="card"><h2>${esc(s.name)}: distribution of per-task Δ</h2>${histogram(s)}
        <div class="muted">${s.per_task.length} tasks × ${s.seeds} seeds · mean ${signed(s.decision.mean_difference)} ${interval(s.decision)} · margin ${signed(s.decision.margin, 2)} → ${pill(s.decision.verdict)}</div></div>`).join("")}</div>`;
  },

  async lineage() {
    const versions = await get("/versions");
    const children = {};
    versions.forEach((v) => (children[v.parent] = children[v.parent] || []).push(v));
    const node = (v) => `<li><span class="node ${v.incumbent ? "incumbent" : ""}" data-version="${esc(v.name)}">
        <span class="mono">${esc(v.name)}</span>${pill(v.status)}${v.incumbent ? `<b class="pos">incumbent</b>` : ""}
        ${v.iteration ? `<a href="#/iteration/${esc(v.iteration)}">iteration</a>` : ""}
        ${!v.incumbent && (v.status === "root" || v.status === "promoted") ? `<button data-action="rollback" data-version="${esc(v.name)}">Roll back here</button>` : ""}</span>
        ${children[v.name] ? `<ul>${children[v.name].map(node).join("")}</ul>` : ""}</li>`;
    return `<h1>Lineage</h1><div class="sub">Scaffold versions by parent; the incumbent is outlined.</div>
      <div class="card tree"><ul>${(children[""] || []).map(node).join("")}</ul></div>`;
  },

  async approvals() {
    const its = await get("/iterations");
    const waiting = its.filter((i) => i.state === "awaiting_approval");
    const decided = await Promise.all(its.filter((i) => ["promoted", "rejected", "rolled_back"].includes(i.state)).slice(0, 20).map((i) => get(`/iterations/${i.id}`)));
    const rows = decided.filter((i) => i.approved_by).map((i) => `<tr><td><a href="#/iteration/${esc(i.id)}">#${i.index}</a></td><td class="mono">${esc(i.candidate)}</td><td>${pill(i.state)}</td><td>${esc(i.approved_by)}</td><td>${esc(i.note)}</td></tr>`).join("");
    return `<h1>Approvals</h1><div class="sub">Promotions wait here for an operator.</div>
      ${waiting.length ? waiting.map((i) => `<div class="card section"><div class="tl-head"><b>#${i.index}</b>${pill(i.state)}<a class="mono" href="#/iteration/${esc(i.id)}">${esc(i.candidate)}</a></div>
        <p>${esc(i.rationale)}</p><p class="muted">dev Δ ${signed(i.decision?.mean_difference)} ${interval(i.decision)}</p>
        <div class="actions"><button class="good" data-action="approve" data-id="${esc(i.id)}">Approve promotion</button><button class="danger" data-action="reject" data-id="${esc(i.id)}">Reject</button></div></div>`).join("")
        : `<div class="empty">Nothing is waiting for approval.</div>`}
      <div class="section"><h2>Decided by operators</h2>${rows ? `<div class="table-wrap"><table><thead><tr><th>iteration</th><th>candidate</th><th>state</th><th>operator</th><th>note</th></tr></thead><tbody>${rows}</tbody></table></div>` : `<div class="empty">No operator decisions yet.</div>`}</div>`;
  },

  async anomalies() {
    const list = await get("/anomalies");
    const rows = list.map((a) => `<tr><td class="mono">${esc(a.run_id)}</td><td>${pill(a.anomaly.severity)} ${esc(a.anomaly.kind.replace(/_/g, " "))}</td>
      <td class="mono">${esc(a.anomaly.metric)}</td><td class="num">${a.anomaly.step}</td><td>${esc(a.anomaly.evidence)}</td><td><b>${esc(a.anomaly.action.replace(/_/g, " "))}</b></td>
      <td>${pill(a.status)}${a.decided_by ? ` <span class="muted">${esc(a.decided_by)}</span>` : ""}${a.outcome ? `<div class="muted">${esc(a.outcome)}</div>` : ""}</td>
      <td>${a.status === "open" ? `<div class="actions"><button class="primary" data-action="anomaly-approve" data-id="${esc(a.id)}">Approve action</button><button data-action="anomaly-dismiss" data-id="${esc(a.id)}">Dismiss</button></div>` : ""}</td></tr>`).join("");
    return `<h1>Anomalies</h1><div class="sub">Training-run diagnosis: detectors over each run's metrics propose an action for you to approve.</div>
      ${rows ? `<div class="table-wrap"><table><thead><tr><th>run</th><th>anomaly</th><th>metric</th><th class="num">step</th><th>evidence</th><th>proposed</th><th>status</th><th></th></tr></thead><tbody>${rows}</tbody></table></div>` : `<div class="empty">No anomalies in the runs' metrics.</div>`}`;
  },

  async budget() {
    const s = await get("/status");
    return `<h1>Budget &amp; controls</h1><div class="sub">The ledger is charged by the controller only; proposals cannot change it.</div>
      <div class="grid cards" style="grid-template-columns:repeat(3,minmax(0,1fr))">${budgetBars(s.budget)}</div>
      <div class="card section"><h2>Loop ${pill(s.status)}</h2><p class="muted">${esc(s.budget.exhausted || s.halt_reason || "")}</p>
        <div class="actions"><button class="primary" data-action="control" data-value="start" ${["running", "paused"].includes(s.status) ? "disabled" : ""}>Start</button>
        <button data-action="control" data-value="pause" ${s.status !== "running" ? "disabled" : ""}>Pause</button>
        <button data-action="control" data-value="resume" ${s.status !== "paused" ? "disabled" : ""}>Resume</button>
        <button class="danger" data-action="control" data-value="halt" ${!["running", "paused"].includes(s.status) ? "disabled" : ""}>Halt</button></div></div>`;
  },

  async audit() {
    const a = await get("/audit");
    const rows = a.entries.map((e) => `<tr><td class="num">${e.seq}</td><td class="nowrap">${when(e.time)}</td><td class="nowrap">${esc(e.kind.replace(/_/g, " "))}</td><td>${esc(e.actor)}</td>
      <td class="data">${esc(brief(e.data))}</td><td class="mono muted">${esc(e.hash.slice(0, 12))}</td></tr>`).join("");
    return `<h1>Audit log</h1><div class="sub">Append-only; each entry hashes the previous one.
        ${a.verified ? `<span class="chain-ok" id="chain">✓ chain verified (${a.entries.length} entries)</span>` : `<span class="chain-bad" id="chain">✗ chain broken at ${a.problems.map((p) => p.seq).join(", ")}</span>`}</div>
      <div class="table-wrap"><table><thead><tr><th class="num">#</th><th>time</th><th>event</th><th>actor</th><th>data</th><th>hash</th></tr></thead><tbody>${rows}</tbody></table></div>`;
  },

  async memory() {
    const m = await get("/memory");
    return `<h1>Memory</h1><div class="sub">The notes the proposer reads before each round.</div>${m.markdown ? `<pre class="md">${esc(m.markdown)}</pre>` : `<div class="empty">No rounds yet.</div>`}`;
  },
};

// An audit entry's data on one line: numbers to 3 decimals, long values cut.
function brief(data) {
  const show = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3))
    : typeof v === "string" ? (v.length > 90 ? `${v.slice(0, 90)}…` : v) : JSON.stringify(v).slice(0, 90));
  return Object.entries(data).map(([k, v]) => `${k}: ${show(v)}`).join(" · ");
}

// -- charts (inline SVG) ------------------------------------------------------------------------

function forest(stages) {
  const W = 860, row = 34, H = stages.length * row + 36, left = 80, right = 200; // right: room for the labels
  const lo = Math.min(-0.2, ...stages.map((s) => s.decision.ci_low)), hi = Math.max(0.2, ...stages.map((s) => s.decision.ci_high));
  const x = (v) => left + ((v - lo) / (hi - lo)) * (W - left - right);
  const margin = stages[0].decision.margin;
  let svg = `<svg width="100%" viewBox="0 0 ${W} ${H}" role="img" aria-label="confidence intervals">`;
  svg += `<line x1="${x(0)}" x2="${x(0)}" y1="6" y2="${H - 24}" stroke="#9aa5b1" stroke-dasharray="3 3"/>`;
  if (margin !== 0) svg += `<line x1="${x(margin)}" x2="${x(margin)}" y1="6" y2="${H - 24}" stroke="#b7791f"/>`;
  stages.forEach((s, i) => {
    const y = 20 + i * row, d = s.decision, color = d.verdict === "promote" ? "#1e8e5a" : d.verdict === "reject" ? "#c8372d" : "#66788a";
    svg += `<text x="8" y="${y + 4}">${esc(s.name)}</text><line x1="${x(d.ci_low)}" x2="${x(d.ci_high)}" y1="${y}" y2="${y}" stroke="${color}" stroke-width="4" stroke-linecap="round"/>`;
    svg += `<circle cx="${x(d.mean_difference)}" cy="${y}" r="6" fill="#fff" stroke="${color}" stroke-width="3"/>`;
    svg += `<text x="${x(d.ci_high) + 8}" y="${y + 4}">${signed(d.mean_difference)} ${interval(d)}</text>`;
  });
  for (let t = Math.ceil(lo * 10) / 10; t <= hi + 1e-9; t += 0.1) svg += `<text x="${x(t)}" y="${H - 8}" text-anchor="middle">${signed(t, 1)}</text>`;
  return svg + "</svg>";
}

function histogram(stage) {
  const W = 360, H = 150, bins = {};
  stage.per_task.forEach((t) => { const k = Math.round(t.difference * 3) / 3; bins[k.toFixed(2)] = (bins[k.toFixed(2)] || 0) + 1; });
  const keys = ["-1.00", "-0.67", "-0.33", "0.00", "0.33", "0.67", "1.00"], max = Math.max(1, ...Object.values(bins));
  const bw = (W - 20) / keys.length;
  let svg = `<svg width="100%" viewBox="0 0 ${W} ${H}" role="img" aria-label="per-task differences">`;
  keys.forEach((k, i) => {
    const n = bins[k] || 0, h = ((H - 40) * n) / max, v = parseFloat(k);
    svg += `<rect x="${10 + i * bw + 4}" y="${H - 22 - h}" width="${bw - 8}" height="${h}" rx="3" fill="${v > 0 ? "#1e8e5a" : v < 0 ? "#c8372d" : "#9aa5b1"}" opacity=".8"/>`;
    svg += `<text x="${10 + i * bw + bw / 2}" y="${H - 8}" text-anchor="middle">${signed(v, 2)}</text>`;
    if (n) svg += `<text x="${10 + i * bw + bw / 2}" y="${H - 26 - h}" text-anchor="middle">${n}</text>`;
  });
  return svg + "</svg>";
}

// -- routing, actions, live updates -------------------------------------------------------------

function route() {
  const [view, arg] = (location.hash.replace(/^#\/?/, "") || "overview").split("/");
  return { view: views[view] ? view : "overview", arg: arg && decodeURIComponent(arg) };
}

async function render() {
  const { view, arg } = route();
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === (view === "iteration" || view === "compare" ? "iterations" : view)));
  try {
    $("#main").innerHTML = await views[view](arg);
  } catch (err) {
    $("#main").innerHTML = `<div class="empty">Could not load this page: ${esc(err.message)}</div>`;
  }
  await header();
}

async function header() {
  const s = await get("/status");
  $("#topstatus").innerHTML = `${pill(s.status)} <span>incumbent <b class="mono">${esc(s.incumbent)}</b></span>
    <span>round ${s.budget.spent.rounds}/${s.budget.limits.rounds}</span>`;
  $("#badge-approvals").textContent = s.awaiting_approval.length || "";
  $("#badge-anomalies").textContent = s.open_anomalies || "";
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  const { action, id } = b.dataset;
  b.disabled = true;
  try {
    if (action === "approve" || action === "reject") {
      const note = ($("#approval-note") || {}).value || "";
      const it = await post(`/iterations/${id}/approve`, { approve: action === "approve", note });
      toast(`Iteration #${it.index}: ${it.state.replace(/_/g, " ")}`);
    } else if (action === "rollback") {
      await post("/rollback", { version: b.dataset.version });
      toast(`Rolled back to ${b.dataset.version}`);
    } else if (action === "control") {
      await post("/control", { action: b.dataset.value });
      toast(`Loop: ${b.dataset.value}`);
    } else if (action.startsWith("anomaly-")) {
      await post(`/anomalies/${id}/decide`, { approve: action === "anomaly-approve" });
      toast("Recorded");
    }
  } catch (err) {
    b.disabled = false;
    return;
  }
  render();
});

function connect() {
  const source = new EventSource(`${API}/events`);
  let timer = null;
  source.onopen = () => $("#live").classList.add("on");
  source.onerror = () => $("#live").classList.remove("on");
  const refresh = () => { clearTimeout(timer); timer = setTimeout(render, 250); };
  ["iteration_started", "candidate_proposed", "stage_finished", "awaiting_approval", "iteration_finished", "rolled_back",
    "started", "paused", "resumed", "halted", "budget_spent", "failed", "anomalies", "anomaly_decided", "anomaly_action"].forEach((k) => source.addEventListener(k, refresh));
}

$("#operator-name").value = sessionStorage.getItem("operator") || "";
$("#operator-token").value = sessionStorage.getItem("token") || "";
window.addEventListener("hashchange", render);
render();
connect();
