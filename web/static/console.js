// The admin console: a snapshot of the fleet arrives every 2 s on admin/ws; rows are updated in
// place (keyed by session id), so nothing flickers and the filter, focus and selection stay.
// Every text from the server goes in through textContent: nothing is parsed as HTML. Every URL
// is under the gateway's base path (base.js).
import { url } from "./base.js";

const body = document.body;
const csrf = body.dataset.csrf;
const live = document.getElementById("console-live");
const denied = document.getElementById("console-denied");
const filter = document.getElementById("filter");
const endUser = document.getElementById("end-user");
const result = document.getElementById("action-result");
const sessionsBody = document.querySelector("#sessions tbody");
const recordingsBody = document.querySelector("#recordings tbody");
const dialog = document.getElementById("confirm");
const rows = new Map();
let last = null;
let stopped = false;

const pad = (n) => String(n).padStart(2, "0");

function idle(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
  return `${Math.floor(s / 3600)}h${pad(Math.floor((s % 3600) / 60))}m`;
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function started(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function memory(row) {
  if (row.memory === null) return "-";
  return row.memory_limit ? `${size(row.memory)} / ${size(row.memory_limit)}` : size(row.memory);
}

function cpu(row) {
  if (row.memory === null) return "-";
  return row.cpu_percent === null ? "measuring" : `${row.cpu_percent.toFixed(1)} %`;
}

// Where the watch and join views live (relative to the console, like every URL here).
const ACTIONS = [
  ["watch", "Watch", (id) => url(`admin/watch/${encodeURIComponent(id)}`)],
  ["join", "Join", (id) => url(`admin/join/${encodeURIComponent(id)}`)],
];

function setText(cell, text) {
  if (cell.textContent !== text) cell.textContent = text;
}

function makeRow(row) {
  const tr = document.createElement("tr");
  tr.dataset.session = row.id;
  for (const name of ["user", "profile", "door", "host", "gateway", "started", "idle", "in", "out", "cpu", "memory"]) {
    const td = document.createElement("td");
    td.dataset.col = name;
    if (["in", "out", "cpu", "memory"].includes(name)) td.className = "num";
    tr.append(td);
  }
  const actions = document.createElement("td");
  actions.dataset.col = "actions";
  actions.className = "actions";
  const end = document.createElement("button");
  end.type = "button";
  end.className = "bar danger";
  end.textContent = "End";
  end.setAttribute("aria-label", `End ${row.user}'s session ${row.id.slice(0, 8)}`);
  end.addEventListener("click", () => confirmEnd({ session: row.id }, `End ${row.user}'s session ${row.id.slice(0, 8)}?`));
  actions.append(end);
  for (const [kind, label, href] of ACTIONS) {
    const link = document.createElement("a");
    link.href = href(row.id);
    link.className = `action-${kind}`;
    link.textContent = label;
    link.setAttribute("aria-label", `${label} ${row.user}'s session ${row.id.slice(0, 8)}`);
    actions.append(" ", link);
  }
  const play = document.createElement("a");
  play.className = "action-play";
  play.textContent = "Recording";
  play.href = url(`admin/play?session=${encodeURIComponent(row.id)}`);
  play.setAttribute("aria-label", `Play the recording of ${row.user}'s session ${row.id.slice(0, 8)}`);
  actions.append(" ", play);
  tr.append(actions);
  return tr;
}

function updateRow(tr, row) {
  const cells = Object.fromEntries([...tr.children].map((td) => [td.dataset.col, td]));
  setText(cells.user, row.user);
  setText(cells.profile, row.profile || "-");
  setText(cells.door, row.door);
  setText(cells.host, row.container || "-");
  setText(cells.gateway, row.gateway);
  setText(cells.started, started(row.started));
  setText(cells.idle, idle(row.idle_seconds));
  setText(cells.in, size(row.bytes_in));
  setText(cells.out, size(row.bytes_out));
  setText(cells.cpu, cpu(row));
  setText(cells.memory, memory(row));
  tr.querySelector(".action-play").hidden = !row.recording;
  tr.hidden = !matches(row.user);
}

function matches(user) {
  const wanted = filter.value.trim().toLowerCase();
  return !wanted || user.toLowerCase().includes(wanted);
}

function renderSessions(sessions) {
  const seen = new Set();
  let previous = null;
  for (const row of sessions) {
    seen.add(row.id);
    let tr = rows.get(row.id);
    if (!tr) {
      tr = makeRow(row);
      rows.set(row.id, tr);
    }
    updateRow(tr, row);
    const wantedAt = previous ? previous.nextSibling : sessionsBody.firstChild;
    if (wantedAt !== tr) sessionsBody.insertBefore(tr, wantedAt);
    previous = tr;
  }
  for (const [id, tr] of rows) {
    if (!seen.has(id)) { tr.remove(); rows.delete(id); }
  }
  const shown = sessions.filter((row) => matches(row.user)).length;
  setText(document.getElementById("sessions-count"),
    shown === sessions.length ? `(${sessions.length})` : `(${shown} of ${sessions.length})`);
  document.getElementById("sessions-empty").hidden = sessions.length > 0;
  const wanted = filter.value.trim();
  const exact = sessions.some((row) => row.user === wanted);
  endUser.hidden = !exact;
  setText(endUser, `End all of ${wanted}'s sessions`);
}

function renderPool(pool) {
  const text = pool === null
    ? "No warm pool on this gateway (session.pool = 0)."
    : `${pool.ready} of ${pool.size} containers ready${pool.filling ? `, ${pool.filling} starting` : ""}.`;
  setText(document.getElementById("pool"), text);
}

function renderRecordings(recordings, sessions) {
  document.getElementById("recordings-off").hidden = recordings !== null;
  document.getElementById("recordings").hidden = recordings === null;
  if (recordings === null) return;
  const liveIds = new Set(sessions.map((row) => row.id));
  const fresh = recordings.map((rec) => {
    const tr = document.createElement("tr");
    tr.dataset.session = rec.session;
    const cells = [rec.session.slice(0, 12), rec.user || "-", rec.door || "-",
      liveIds.has(rec.session) ? "live" : "ended", size(rec.bytes), started(rec.modified)];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    tr.children[4].className = "num";
    const td = document.createElement("td");
    const link = document.createElement("a");
    link.href = url(`admin/play?session=${encodeURIComponent(rec.session)}`);
    link.textContent = "Play";
    link.setAttribute("aria-label", `Play the recording of session ${rec.session.slice(0, 12)}`);
    td.append(link);
    tr.append(td);
    return tr;
  });
  replaceIfChanged(recordingsBody, fresh);
}

// Replaced only when something changed: a link being focused or clicked stays put.
function replaceIfChanged(container, items) {
  const signature = items.map((item) => item.textContent).join("\n");
  if (container.dataset.signature !== signature) {
    container.replaceChildren(...items);
    container.dataset.signature = signature;
  }
}

function describe(event) {
  const { ts, event: name, gateway, ...rest } = event;
  return Object.entries(rest)
    .filter(([, value]) => value !== null && value !== "" && typeof value !== "object")
    .map(([key, value]) => `${key}=${value}`)
    .join(" ");
}

function renderAudit(audit) {
  document.getElementById("audit-off").hidden = audit !== null;
  const list = document.getElementById("audit");
  if (audit === null) { list.replaceChildren(); return; }
  const items = audit.slice().reverse().map((event) => {
    const li = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = event.ts ? started(event.ts) : "";
    if (event.ts) time.dateTime = event.ts;
    const name = document.createElement("strong");
    name.textContent = String(event.event);
    const text = document.createElement("span");
    text.textContent = event.text !== undefined ? event.text : describe(event);
    li.append(time, " ", name, " ", text);
    return li;
  });
  replaceIfChanged(list, items);
}

function render(snapshot) {
  last = snapshot;
  renderSessions(snapshot.sessions);
  renderPool(snapshot.pool);
  renderRecordings(snapshot.recordings, snapshot.sessions);
  renderAudit(snapshot.audit);
  const at = new Date(snapshot.at * 1000);
  setText(live, `live, updated ${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}`);
  body.dataset.live = "live";
}

function stop(message) {
  stopped = true;
  body.dataset.live = "denied";
  setText(live, "stopped");
  denied.textContent = message;
  denied.hidden = false;
  for (const button of document.querySelectorAll("main button")) button.disabled = true;
}

function connect() {
  const address = new URL(url("admin/ws"), location.href);
  address.protocol = address.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(address);
  socket.addEventListener("message", (msg) => {
    let data;
    try { data = JSON.parse(msg.data); } catch { return; }
    if (data.type === "snapshot") render(data);
    else if (data.type === "denied") stop(`The console stopped: ${data.message}`);
    else if (data.type === "error") setText(live, `not updated: ${data.message}`);
  });
  socket.addEventListener("close", (event) => {
    if (stopped || event.code === 4003) {
      if (!stopped) stop("The console stopped: you are no longer allowed to use it.");
      return;
    }
    body.dataset.live = "reconnecting";
    setText(live, "connection lost: reconnecting…");
    setTimeout(connect, 2000);
  });
}

async function end(target) {
  const form = new URLSearchParams({ csrf, ...target });
  let response;
  try {
    response = await fetch(url("admin/end"), { method: "POST", body: form, credentials: "same-origin" });
  } catch {
    setText(result, "The gateway did not answer; nothing was ended.");
    return;
  }
  if (!response.ok) {
    setText(result, `Not ended: ${(await response.text()).slice(0, 200)}`);
    if (response.status === 403 || response.status === 401) stop("The console stopped: you are no longer allowed to use it.");
    return;
  }
  const { killed } = await response.json();
  setText(result, `Ended ${killed.length} session${killed.length === 1 ? "" : "s"}${target.user ? ` of ${target.user}` : ""}.`);
}

let pending = null;
function confirmEnd(target, question) {
  pending = target;
  setText(document.getElementById("confirm-text"),
    `${question} The person sees that an administrator ended it (reason: killed).`);
  dialog.showModal();
}

document.getElementById("confirm-cancel").addEventListener("click", () => dialog.close());
document.getElementById("confirm-ok").addEventListener("click", () => {
  dialog.close();
  if (pending) end(pending);
  pending = null;
});
endUser.addEventListener("click", () => {
  const user = filter.value.trim();
  confirmEnd({ user }, `End every session of ${user}?`);
});
filter.addEventListener("input", () => { if (last) renderSessions(last.sessions); });

connect();
