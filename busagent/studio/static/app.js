// busagent studio: one page over the JSON API under /api/ (no build step, no framework).
"use strict";

// --- token: given once as ?token=T (as printed at start), kept for this tab --------------
(function takeToken() {
  const u = new URL(location.href);
  const t = u.searchParams.get("token");
  if (t) {
    sessionStorage.setItem("busagent-token", t);
    u.searchParams.delete("token");
    history.replaceState(null, "", u.pathname + u.search + u.hash);
  }
})();
const token = () => sessionStorage.getItem("busagent-token") || "";

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmtMiB = (v) => (v >= 1024 ? (v / 1024).toFixed(2) + " GiB" : v.toFixed(1) + " MiB");
const fmtMs = (s) => (s == null ? "-" : "≤" + (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms");
const fmtTime = (t) => new Date(t * 1000).toLocaleString();
const fmtDur = (s) => { s = Math.floor(s); const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`; };

async function api(path, opts = {}) {
  const headers = opts.method && opts.method !== "GET" ? {"Authorization": "Bearer " + token()} : {};
  const r = await fetch(path, {...opts, headers});
  const body = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function flash(text, ok = false) {
  const f = $("#flash");
  f.textContent = text; f.className = "flash" + (ok ? " ok" : ""); f.hidden = false;
  clearTimeout(flash.t); flash.t = setTimeout(() => { f.hidden = true; }, ok ? 4000 : 10000);
}

async function act(what, path, method, confirmText) {
  if (confirmText && !confirm(confirmText)) return null;
  try { const r = await api(path, {method}); flash(what + ": done", true); return r; }
  catch (e) { flash(what + " failed: " + e.message); return null; }
}

function showToken() {
  $("#token-state").innerHTML = token() ? "token set" :
    'read-only (no token) <button id="set-token">enter token</button>';
  const b = $("#set-token");
  if (b) b.onclick = () => { const t = prompt("Studio token (printed by `busagent studio`):"); if (t) { sessionStorage.setItem("busagent-token", t); showToken(); } };
}

// --- live state from /api/events ----------------------------------------------------------
const live = {summary: null, history: [], listeners: []};
function onLive(fn) { live.listeners.push(fn); }

function spark(values, w = 70, h = 18, color = "#2f6fde") {
  const v = values.filter((x) => x != null);
  if (v.length < 2) return "";
  const max = Math.max(...v, 1e-9), min = Math.min(...v, 0);
  const pts = v.map((x, i) => `${(i / (v.length - 1) * w).toFixed(1)},${(h - (x - min) / (max - min || 1) * h).toFixed(1)}`).join(" ");
  return `<svg class="spark" width="${w}" height="${h}"><polyline fill="none" stroke="${color}" stroke-width="1.3" points="${pts}"/></svg>`;
}

function renderSummary() {
  const s = live.summary; if (!s) return;
  const st = s.servers;
  const cards = [["servers up", st.up], ["late", st.late], ["dead", st.dead], ["agents", s.agents.toLocaleString()],
    ["calls in flight", s.inflight], ["calls/s", s.rate.toFixed(1)], ["answered", s.calls.toLocaleString()],
    ["errors", s.errors], ["dead letters", s.deadletters], ["Redis", fmtMiB((s.redis.used_memory || 0) / 1048576) + " · " + s.redis.version]];
  $("#summary").innerHTML = cards.map(([k, v]) => `<div class="card"><b>${esc(v)}</b><span>${esc(k)}</span></div>`).join("");
}

function connect() {
  const es = new EventSource("/api/events");
  es.onmessage = (ev) => {
    const d = JSON.parse(ev.data);
    if (d.error) flash("studio cannot read Redis: " + d.error);
    if (d.summary) {
      live.summary = d.summary;
      if (d.sample) { live.history.push(d.sample); if (live.history.length > 600) live.history.shift(); }
      renderSummary();
      live.listeners.forEach((fn) => fn());
    }
  };
}

// --- views ---------------------------------------------------------------------------------
const views = {};
let cleanup = [];
function leave() { cleanup.forEach((f) => f()); cleanup = []; live.listeners = []; }

views.servers = () => {
  $("#view").innerHTML = `<h2>Servers</h2><table id="servers-table"><thead><tr><th>name</th><th>host</th><th>pid</th><th>status</th>
    <th>cpu</th><th>memory</th><th>agents / capacity</th><th>in flight</th><th>calls/s</th><th>p50 / p99</th><th>modules</th><th>started</th><th>uptime</th><th></th></tr></thead><tbody></tbody></table>`;
  const draw = () => {
    const rows = (live.summary ? live.summary.rows : []);
    const hist = (name, key) => live.history.map((h) => (h.servers[name] || {})[key]);
    $("#servers-table tbody").innerHTML = rows.map((s) => `<tr data-server="${esc(s.name)}">
      <td><a href="#logs/${encodeURIComponent(s.name)}">${esc(s.name)}</a></td><td>${esc(s.host)}</td><td class="num">${s.pid}</td>
      <td><span class="badge ${s.state}">${s.state}</span> <span class="muted age">${s.age}s ago</span></td>
      <td class="num cpu">${s.cpu.toFixed(0)} %${spark(hist(s.name, "cpu"))}</td>
      <td class="num mem">${fmtMiB(s.mem)}${spark(hist(s.name, "mem"), 70, 18, "#805ad5")}</td>
      <td class="num">${s.agents.toLocaleString()} / ${s.capacity.toLocaleString()}</td><td class="num">${s.inflight}</td>
      <td class="num">${s.rate.toFixed(1)}</td><td class="num">${fmtMs(s.p50)} / ${fmtMs(s.p99)}</td>
      <td>${esc(s.modules.join(", "))}</td><td>${fmtTime(s.started)}</td><td>${fmtDur(s.uptime)}</td>
      <td>${s.state === "dead" ? `<button class="forget danger" data-name="${esc(s.name)}">forget</button>` :
        `<button class="stop" data-name="${esc(s.name)}">stop</button> <button class="drain" data-name="${esc(s.name)}">drain</button>`}</td></tr>`).join("")
      || `<tr><td colspan="14" class="muted">no servers registered</td></tr>`;
  };
  $("#servers-table").onclick = (ev) => {
    const b = ev.target.closest("button"); if (!b) return;
    const n = b.dataset.name, p = "/api/servers/" + encodeURIComponent(n);
    if (b.classList.contains("stop")) act("stop " + n, p + "/stop", "POST", `Stop server ${n}? Calls in flight finish; its agents are deleted.`);
    if (b.classList.contains("drain")) act("drain " + n, p + "/drain", "POST", `Drain server ${n}? Its agents move to other live servers, then it stops.`);
    if (b.classList.contains("forget")) act("forget " + n, p, "DELETE", `Forget dead server ${n}'s record?`);
  };
  onLive(draw); draw();
};

views.agents = () => {
  $("#view").innerHTML = `<h2>Agents</h2><div class="toolbar">
    <input id="agent-q" placeholder="name or id contains…" size="28"><input id="agent-cls" placeholder="class contains…">
    <input id="agent-server" placeholder="server"><input id="agent-ns" placeholder="namespace"><button id="agent-search">Search</button>
    <span class="muted" id="agent-count"></span></div>
    <table id="agents-table"><thead><tr><th>name</th><th>id</th><th>class</th><th>server</th><th>namespace</th><th>created</th></tr></thead><tbody></tbody></table>
    <div class="toolbar"><button id="agent-more" hidden>More</button><span class="muted" id="agent-scan"></span></div>`;
  let cursor = "0", shown = 0, scanned = 0, generation = 0;
  const load = async (fresh) => {
    if (fresh) { cursor = "0"; shown = 0; scanned = 0; generation++; $("#agents-table tbody").innerHTML = ""; }
    const mine = generation;
    const qs = new URLSearchParams({cursor, count: 50, q: $("#agent-q").value, cls: $("#agent-cls").value, server: $("#agent-server").value, namespace: $("#agent-ns").value});
    try {
      const page = await api("/api/agents?" + qs);
      if (mine !== generation || !$("#agents-table")) return;  // a newer search, or another view
      $("#agents-table tbody").insertAdjacentHTML("beforeend", page.items.map((a) => `<tr data-agent="${esc(a.id)}">
        <td><a href="#agent/${encodeURIComponent(a.id)}">${esc(a.name)}</a></td><td><code>${esc(a.id)}</code></td><td>${esc(a.cls)}</td>
        <td>${esc(a.server)}</td><td>${esc(a.namespace)}${a.registered ? " / " + esc(a.registered) : ""}</td><td>${fmtTime(a.created)}</td></tr>`).join(""));
      cursor = page.cursor; shown += page.items.length; scanned += page.scanned;
      $("#agent-more").hidden = cursor === "0";
      $("#agent-count").textContent = `${shown} shown` + (live.summary ? ` of ${live.summary.agents.toLocaleString()} registered` : "");
      $("#agent-scan").textContent = cursor === "0" ? "end of registry" : `${scanned.toLocaleString()} records looked at so far`;
    } catch (e) { flash(e.message); }
  };
  $("#agent-search").onclick = () => load(true);
  $("#agent-q").onkeydown = (e) => { if (e.key === "Enter") load(true); };
  $("#agent-more").onclick = () => load(false);
  load(true);
};

views.agent = async (id) => {
  let start = -20;
  const draw = async () => {
    let a;
    try { a = await api(`/api/agents/${encodeURIComponent(id)}?mem_start=${start}&mem_count=20`); }
    catch (e) { $("#view").innerHTML = `<h2>Agent</h2><p class="muted" id="agent-missing">${esc(e.message)}</p>`; return; }
    start = a.memory.start;
    $("#view").innerHTML = `<h2 id="agent-name">${esc(a.name)}</h2>
      <table id="agent-record"><tbody>
      <tr><th>id</th><td><code>${esc(a.id)}</code></td></tr><tr><th>class</th><td>${esc(a.cls)}</td></tr>
      <tr><th>server</th><td>${esc(a.server)}</td></tr><tr><th>created</th><td>${fmtTime(a.created)}</td></tr>
      <tr><th>constructor</th><td><code>${esc(a.args_error || JSON.stringify({args: a.args, kwargs: a.kwargs}))}</code></td></tr></tbody></table>
      <div class="toolbar"><button id="agent-delete" class="danger">delete agent</button></div>
      <h3>Running now</h3><table><tbody>${a.running.map((c) => `<tr><td>${esc(c.kind)}</td><td><code>${esc(c.call)}</code></td><td>${c.for}s</td></tr>`).join("") || '<tr><td class="muted">nothing</td></tr>'}</tbody></table>
      <h3>Memory <span class="muted">(${a.memory.start + 1}–${a.memory.start + a.memory.items.length} of ${a.memory.total})</span></h3>
      <div class="toolbar"><button id="mem-prev" ${a.memory.start === 0 ? "disabled" : ""}>older</button>
        <button id="mem-next" ${a.memory.start + a.memory.items.length >= a.memory.total ? "disabled" : ""}>newer</button></div>
      <table id="agent-memory"><thead><tr><th>name</th><th>role</th><th>content</th><th>time</th></tr></thead><tbody>
      ${a.memory.items.map((m) => `<tr><td>${esc(m.name)}</td><td>${esc(m.role)}</td><td>${esc(typeof m.content === "string" ? m.content : JSON.stringify(m.content))}</td><td>${esc(m.timestamp || "")}</td></tr>`).join("") || '<tr><td colspan="4" class="muted">empty</td></tr>'}
      </tbody></table>`;
    $("#mem-prev").onclick = () => { start = Math.max(0, start - 20); draw(); };
    $("#mem-next").onclick = () => { start = start + 20; draw(); };
    $("#agent-delete").onclick = async () => {
      if (await act("delete " + a.name, "/api/agents/" + encodeURIComponent(id), "DELETE", `Delete agent ${a.name}? Calls already sent to it are answered first.`)) location.hash = "#agents";
    };
  };
  $("#view").innerHTML = "<h2>Agent</h2>"; draw();
};

views.calls = () => {
  $("#view").innerHTML = `<h2>Calls running now</h2><table id="calls-table"><thead><tr><th>server</th><th>agent</th><th>kind</th><th>call</th><th>since</th><th>for</th></tr></thead><tbody></tbody></table>`;
  const draw = async () => {
    try {
      const calls = await api("/api/calls");
      $("#calls-table tbody").innerHTML = calls.map((c) => `<tr><td>${esc(c.server)}</td><td><a href="#agent/${encodeURIComponent(c.agent)}">${esc(c.agent)}</a></td>
        <td>${esc(c.kind)}</td><td><code>${esc(c.call)}</code></td><td>${fmtTime(c.since)}</td><td class="num">${c.for.toFixed(1)} s</td></tr>`).join("")
        || '<tr><td colspan="6" class="muted">no calls running</td></tr>';
    } catch (e) { flash(e.message); }
  };
  onLive(draw); draw();
};

views.deadletters = () => {
  $("#view").innerHTML = `<h2>Dead letters</h2><table id="dead-table"><thead><tr><th>entry</th><th>agent</th><th>kind</th><th>call</th><th>reason</th><th>tries</th><th>server</th><th></th></tr></thead><tbody></tbody></table>`;
  const draw = async () => {
    try {
      const rows = await api("/api/deadletters");
      // Rewritten only when it changed: a live redraw every sample would replace the buttons
      // under the user's pointer (and a browser test's click) for nothing.
      const html = rows.map((d) => `<tr data-entry="${esc(d.id)}"><td><code>${esc(d.id)}</code></td><td>${esc(d.agent)}</td><td>${esc(d.kind)}</td>
        <td><code>${esc(d.call)}</code></td><td class="reason">${esc(d.reason)}</td><td class="num">${esc(d.tries)}</td><td>${esc(d.server)}</td>
        <td>${d.call && d.agent ? `<button class="replay" data-id="${esc(d.id)}">replay</button>` : ""}</td></tr>`).join("")
        || '<tr><td colspan="8" class="muted">no dead letters</td></tr>';
      const body = $("#dead-table tbody");
      if (body && body.dataset.drawn !== html) { body.innerHTML = html; body.dataset.drawn = html; }
    } catch (e) { flash(e.message); }
  };
  $("#dead-table").onclick = async (ev) => {
    const b = ev.target.closest("button.replay"); if (!b) return;
    if (await act("replay " + b.dataset.id, `/api/deadletters/${encodeURIComponent(b.dataset.id)}/replay`, "POST", "Send this call again to its agent?")) draw();
  };
  draw();
};

views.hubs = () => {
  $("#view").innerHTML = `<h2>Hubs</h2><table id="hubs-table"><tbody></tbody></table>`;
  api("/api/hubs").then((hubs) => {
    $("#hubs-table tbody").innerHTML = hubs.map((h) => `<tr><td><a href="#hub/${encodeURIComponent(h)}">${esc(h)}</a></td></tr>`).join("")
      || '<tr><td class="muted">no hubs</td></tr>';
  }).catch((e) => flash(e.message));
};

views.hub = async (name) => {
  $("#view").innerHTML = `<h2>Hub ${esc(name)}</h2><h3>Members</h3><table id="hub-members"><thead><tr><th>name</th><th>role</th><th>watcher</th><th>id</th></tr></thead><tbody></tbody></table>
    <h3>Transcript <span class="muted">(live)</span></h3><div id="transcript" class="transcript"></div>`;
  try {
    const h = await api("/api/hubs/" + encodeURIComponent(name));
    $("#hub-members tbody").innerHTML = h.members.map((m) => `<tr><td>${esc(m.name)}</td><td>${esc(m.role)}</td><td>${m.watcher ? "yes" : ""}</td><td><code>${esc(m.id)}</code></td></tr>`).join("")
      || '<tr><td colspan="4" class="muted">no members</td></tr>';
    const msgs = await api(`/api/hubs/${encodeURIComponent(name)}/messages?count=100`);
    const add = (m) => $("#transcript").insertAdjacentHTML("beforeend", `<div class="msg" data-seq="${esc(m.seq)}"><span class="who">${esc(m.name)}</span>
      <span class="muted">${esc(m.role)} → ${esc(m.send_to.join(", "))} · ${esc(m.seq)}</span><div class="content">${esc(typeof m.content === "string" ? m.content : JSON.stringify(m.content))}</div></div>`);
    msgs.forEach(add);
    const last = msgs.length ? msgs[msgs.length - 1].seq : "0-0";
    const es = new EventSource(`/api/hubs/${encodeURIComponent(name)}/events?after=${encodeURIComponent(last)}`);
    es.onmessage = (ev) => add(JSON.parse(ev.data));
    cleanup.push(() => es.close());
  } catch (e) { flash(e.message); }
};

views.charts = () => {
  $("#view").innerHTML = `<h2>Throughput and latency <span class="muted">(since this page opened; p50/p99 over the last minute)</span></h2><div class="charts">
    <div class="chart" id="chart-rate"></div><div class="chart" id="chart-lat"></div></div>`;
  let plots = [];
  const build = () => {
    const names = live.summary ? live.summary.rows.map((s) => s.name) : [];
    const h = live.history;
    const x = h.map((s) => s.t);
    const rateData = [x, h.map((s) => s.rate), h.map((s) => s.err), ...names.map((n) => h.map((s) => (s.servers[n] || {}).rate ?? null))];
    const ms = (v) => (v == null ? null : v * 1000);
    const latData = [x, h.map((s) => ms(s.p50)), h.map((s) => ms(s.p99)), ...names.map((n) => h.map((s) => ms((s.servers[n] || {}).p99)))];
    const palette = ["#1f9d55", "#d69e2e", "#805ad5", "#319795", "#dd6b20", "#3182ce"];
    const width = Math.max(520, Math.floor(($("#chart-rate").clientWidth || 560) - 16));
    plots.forEach((p) => p.destroy());
    plots = [
      new uPlot({title: "calls/s and errors/s", width, height: 240, series: [{}, {label: "calls/s (all)", stroke: "#2f6fde", width: 2},
        {label: "errors/s", stroke: "#c53030"}, ...names.map((n, i) => ({label: n, stroke: palette[i % palette.length]}))]}, rateData, $("#chart-rate")),
      new uPlot({title: "call time, ms (bucket bounds)", width, height: 240, series: [{}, {label: "p50 (all)", stroke: "#2f6fde", width: 2}, {label: "p99 (all)", stroke: "#c53030", width: 2},
        ...names.map((n, i) => ({label: "p99 " + n, stroke: palette[i % palette.length], dash: [4, 3]}))]}, latData, $("#chart-lat")),
    ];
  };
  onLive(build); build();
  cleanup.push(() => plots.forEach((p) => p.destroy()));
};

views.logs = (server) => {
  const names = live.summary ? live.summary.rows.map((s) => s.name) : [];
  $("#view").innerHTML = `<h2>Logs</h2><div class="toolbar"><select id="log-server">${names.map((n) => `<option ${n === server ? "selected" : ""}>${esc(n)}</option>`).join("")}</select>
    <span class="muted">newest 200 lines, then live</span></div><pre id="log-lines"></pre>`;
  server = server || names[0];
  $("#log-server").onchange = (e) => { location.hash = "#logs/" + encodeURIComponent(e.target.value); };
  if (!server) { $("#log-lines").textContent = "no servers"; return; }
  let last = "";
  const poll = async () => {
    try {
      const lines = await api(`/api/logs/${encodeURIComponent(server)}?count=200&after=${encodeURIComponent(last)}`);
      if (!last && !lines.length) last = "0-0";
      const pre = $("#log-lines"); if (!pre) return;
      lines.forEach((l) => { last = l.id; pre.insertAdjacentHTML("beforeend", `<div class="logline level-${esc(l.level)}">${esc(new Date(l.t * 1000).toLocaleTimeString())} ${esc(l.level)} ${esc(l.logger)}: ${esc(l.msg)}</div>`); });
    } catch (e) { flash(e.message); }
  };
  poll(); const t = setInterval(poll, 1500); cleanup.push(() => clearInterval(t));
};

views.models = () => {
  $("#view").innerHTML = `<h2>Models</h2><table id="models-table"><thead><tr><th>config</th><th>type</th><th>model</th><th>base url</th><th>api key</th><th>concurrency</th><th>timeout</th></tr></thead><tbody></tbody></table>`;
  api("/api/models").then((ms) => {
    $("#models-table tbody").innerHTML = ms.map((m) => `<tr><td>${esc(m.config_name)}</td><td>${esc(m.model_type)}</td><td>${esc(m.model_name)}</td>
      <td>${esc(m.base_url || (m.client_args || {}).base_url || "")}</td><td>${esc(m.api_key || "")}</td><td>${esc(m.concurrency)}</td><td>${esc(m.timeout)}</td></tr>`).join("")
      || '<tr><td colspan="7" class="muted">no model configs (busagent models --load FILE)</td></tr>';
  }).catch((e) => flash(e.message));
};

function route() {
  leave();
  const [name, ...rest] = (location.hash.slice(1) || "servers").split("/");
  const arg = rest.length ? decodeURIComponent(rest.join("/")) : undefined;
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === "#" + (name === "agent" ? "agents" : name === "hub" ? "hubs" : name)));
  (views[name] || views.servers)(arg);
}

showToken();
connect();
window.addEventListener("hashchange", route);
api("/api/history").then((h) => { live.history = h; route(); }).catch(() => route());
