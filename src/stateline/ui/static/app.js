// The stateline dashboard: plain JS, no build step. Reads the API with the key typed in (kept in
// sessionStorage) and follows the change feed over Server-Sent Events (a fetch stream, so the key
// travels in a header, never in a URL), resuming with Last-Event-ID after a disconnect.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { key: sessionStorage.getItem("stateline.key") || "", lastId: null, abort: null, runId: null, caseId: null };
const MAX_FEED = 300;

function headers() {
  return { Authorization: "Bearer " + state.key };
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (res.status === 304) return null;
  const body = await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error((body && body.error && body.error.message) || res.statusText);
    err.status = res.status;
    err.code = body && body.error && body.error.code;
    throw err;
  }
  return body;
}

function text(el, value) {
  el.textContent = value == null ? "" : String(value);
  return el;
}

function cell(tr, value, cls) {
  const td = document.createElement("td");
  text(td, value);
  td.title = td.textContent;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function time(us) {
  if (!us) return "";
  return new Date(us / 1000).toLocaleTimeString();
}

function setStatus(kind, message) {
  const el = $("#status");
  el.className = "status " + kind;
  text(el, message);
}

// ---------------------------------------------------------------- change feed

function describeOp(op) {
  if (op.op === "append") return "append " + op.stream + " [" + op.events.map((e) => e.type).join(", ") + "]";
  if (op.op === "trim") return "trim " + op.stream + " <" + op.before_seq;
  return op.op + " " + op.namespace + "/" + op.key + " v" + op.version;
}

function isAudit(op) {
  return (op.namespace || "").startsWith("audit") || (op.stream || "").startsWith("audit:");
}

function addChange(change, fresh) {
  const feed = $("#feed");
  const li = document.createElement("li");
  li.dataset.revision = change.revision;
  const allAudit = change.ops.every(isAudit);
  li.dataset.audit = allAudit ? "1" : "0";
  if (allAudit && $("#hide-audit").checked) li.hidden = true;
  if (fresh) li.className = "fresh";
  const rev = document.createElement("span");
  rev.className = "rev";
  text(rev, "#" + change.revision);
  const when = document.createElement("span");
  when.className = "time";
  text(when, time(change.committed_at) + " ");
  const what = document.createElement("span");
  const actor = change.meta && change.meta.actor ? " · " + change.meta.actor : "";
  text(what, change.ops.map(describeOp).join("; ") + actor);
  li.append(rev, when, what);
  feed.prepend(li);
  while (feed.children.length > MAX_FEED) feed.lastChild.remove();
}

function touches(change, test) {
  return change.ops.some((op) => test(op.namespace || "", op.stream || "", op.key || ""));
}

let refreshTimer = null;
function onChange(change) {
  addChange(change, true);
  // Refresh the panels a change concerns, at most a few times a second.
  const runs = touches(change, (ns, stream) => ns.startsWith("runs") || stream.startsWith("runs:"));
  const theCase = state.caseId && touches(change, (ns, stream, key) => stream.startsWith("cases:" + state.caseId) || (ns.startsWith("cases") && key.startsWith(state.caseId)));
  if (!runs && !theCase) return;
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => {
    if (runs) loadRuns();
    if (theCase) openCase(state.caseId);
  }, 150);
}

async function follow() {
  if (state.abort) state.abort.abort();
  const controller = new AbortController();
  state.abort = controller;
  while (!controller.signal.aborted) {
    try {
      const h = headers();
      if (state.lastId !== null) h["Last-Event-ID"] = String(state.lastId);
      const res = await fetch("/v1/watch", { headers: h, signal: controller.signal, cache: "no-store" });
      if (res.status === 410) {
        // retention removed changes after our last one: say so, go on from the oldest one kept
        const body = await res.json();
        setStatus("err", body.error.message);
        state.lastId = body.error.details.first_available - 1;
        continue;
      }
      if (!res.ok) {
        setStatus("err", "watch refused: " + res.status);
        if (res.status === 401 || res.status === 403) return;
        throw new Error("status " + res.status);
      }
      setStatus("on", "live");
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          handleEvent(block);
        }
      }
    } catch (err) {
      if (controller.signal.aborted) return;
      setStatus("err", "reconnecting…");
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function handleEvent(block) {
  let id = null, data = "", kind = "change";
  for (const line of block.split("\n")) {
    if (line.startsWith("id: ")) id = line.slice(4);
    else if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (!data) return;
  if (kind === "error") {
    // retention overtook us and the server ends the stream: reconnect from the oldest change kept
    const body = JSON.parse(data);
    setStatus("err", body.error.message);
    state.lastId = body.error.details.first_available - 1;
    return;
  }
  const change = JSON.parse(data);
  if (id !== null) state.lastId = Number(id);
  onChange(change);
}

// ---------------------------------------------------------------- runs

async function loadRuns() {
  let out;
  try {
    out = await api("/v1/runs?limit=50");
  } catch (err) {
    text($("#runs tbody"), err.status === 403 ? "this key cannot read runs" : err.message);
    return;
  }
  const runs = out.runs.sort((a, b) => b.updated_at - a.updated_at);
  const body = $("#runs tbody");
  body.replaceChildren();
  for (const run of runs) {
    const tr = document.createElement("tr");
    tr.dataset.run = run.run_id;
    cell(tr, run.run_id);
    cell(tr, run.flow_id);
    cell(tr, run.status, "status-" + run.status);
    const total = run.step_ids.length;
    const done = run.steps.length ? run.steps.filter((s) => s.status === "completed").length + "/" : "";
    cell(tr, done + total);
    cell(tr, time(run.updated_at), "time");
    tr.addEventListener("click", () => showRun(run.run_id));
    body.appendChild(tr);
  }
  if (state.runId) showRun(state.runId);
}

async function showRun(runId) {
  state.runId = runId;
  let run, usage;
  try {
    [run, usage] = await Promise.all([api("/v1/runs/" + encodeURIComponent(runId)), api("/v1/runs/" + encodeURIComponent(runId) + "/usage")]);
  } catch (err) {
    return;
  }
  $("#run-detail").hidden = false;
  text($("#run-id"), runId);
  text($("#run-usage"), "usage: " + usage.tokens + " tokens · $" + Number(usage.cost_usd).toFixed(4) + " · " + usage.steps + " metered steps");
  const body = $("#steps tbody");
  body.replaceChildren();
  for (const s of run.steps) {
    const tr = document.createElement("tr");
    cell(tr, s.step_id);
    cell(tr, s.kind);
    cell(tr, s.status, "status-" + s.status);
    cell(tr, s.attempts + "/" + s.max_attempts);
    cell(tr, s.worker_id || "");
    cell(tr, s.usage ? s.usage.tokens : "");
    cell(tr, s.usage ? "$" + Number(s.usage.cost_usd).toFixed(4) : "");
    body.appendChild(tr);
  }
}

// ---------------------------------------------------------------- cases

async function openCase(caseId) {
  state.caseId = caseId;
  const path = "/v1/cases/" + encodeURIComponent(caseId);
  let found, receipts, verify;
  try {
    [found, receipts, verify] = await Promise.all([api(path), api(path + "/receipts"), api(path + "/verify")]);
  } catch (err) {
    $("#case-detail").hidden = false;
    text($("#case-version"), "—");
    text($("#case-state"), err.message);
    $("#receipts").replaceChildren();
    text($("#case-verify"), "");
    return;
  }
  $("#case-detail").hidden = false;
  text($("#case-version"), found.version);
  text($("#case-state"), JSON.stringify(found.state, null, 2));
  const v = $("#case-verify");
  v.className = verify.ok ? "ok" : "bad";
  text(v, verify.ok ? "verified: " + verify.checked + " receipts chain correctly" : "NOT verified: receipt " + verify.first_bad_seq + " " + verify.reason);
  const list = $("#receipts");
  list.replaceChildren();
  for (const r of receipts.receipts) {
    const li = document.createElement("li");
    text(li, "#" + r.seq + " v" + r.version + " " + time(r.timestamp) + " " + r.hash.slice(0, 12) + "… " + r.mutations.map((m) => m.op || m.type || "?").join(", "));
    list.appendChild(li);
  }
}

// ---------------------------------------------------------------- audit

async function searchAudit(form) {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData(form)) if (v) params.set(k, v);
  params.set("limit", "100");
  const body = $("#audit tbody");
  let page;
  try {
    page = await api("/v1/audit?" + params);
  } catch (err) {
    body.replaceChildren();
    const tr = document.createElement("tr");
    cell(tr, err.status === 403 ? "this key cannot read the audit log" : err.message);
    body.appendChild(tr);
    return;
  }
  body.replaceChildren();
  for (const e of page.entries) {
    const tr = document.createElement("tr");
    cell(tr, e.seq);
    cell(tr, time(e.ts), "time");
    cell(tr, e.user);
    cell(tr, e.action);
    cell(tr, e.resource_type + (e.resource_id ? "/" + e.resource_id : ""));
    cell(tr, e.ip || (e.details && e.details.client) || "");
    cell(tr, e.trace_id ? e.trace_id.slice(0, 12) + "…" : "");
    body.appendChild(tr);
  }
  api("/v1/audit/verify").then((v) => {
    const el = $("#audit-verify");
    el.className = v.ok ? "ok" : "bad";
    text(el, v.ok ? "chain verified (" + v.checked + ")" : "chain broken at " + v.first_bad_seq + ": " + v.reason);
  }).catch(() => {});
}

// ---------------------------------------------------------------- start

async function connect() {
  if (!state.key) {
    setStatus("off", "enter an API key");
    return;
  }
  setStatus("off", "connecting…");
  let stats;
  try {
    stats = await api("/v1/stats");
  } catch (err) {
    setStatus("err", err.status === 401 ? "key refused" : err.message);
    return;
  }
  text($("#tenant-info"), "tenant " + stats.tenant + " · revision " + stats.revision);
  $("#feed").replaceChildren();
  const from = Math.max(0, stats.revision - 50);
  try {
    const recent = await api("/v1/changes?after=" + from + "&limit=50");
    recent.changes.forEach((c) => addChange(c, false));
  } catch (err) { /* a key without changes:read still sees the other panels */ }
  state.lastId = stats.revision;
  follow();
  loadRuns();
  searchAudit($("#audit-form"));
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("#api-key").value.trim();
  sessionStorage.setItem("stateline.key", state.key);
  connect();
});
$("#case-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = $("#case-id").value.trim();
  if (id) openCase(id);
});
$("#audit-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  searchAudit(ev.target);
});
$("#hide-audit").addEventListener("change", (ev) => {
  for (const li of $("#feed").children) li.hidden = ev.target.checked && li.dataset.audit === "1";
});
if (state.key) {
  $("#api-key").value = state.key;
  connect();
}
