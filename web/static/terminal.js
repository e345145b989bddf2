// termbridge terminal page: xterm.js wired to /ws (binary frames: terminal bytes; text: JSON control).
import "./csp.js";
import { Terminal } from "./vendor/xterm/lib/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit/lib/addon-fit.mjs";
import { SearchAddon } from "./vendor/addon-search/lib/addon-search.mjs";
import { Unicode11Addon } from "./vendor/addon-unicode11/lib/addon-unicode11.mjs";
import { WebLinksAddon } from "./vendor/addon-web-links/lib/addon-web-links.mjs";
import { WebglAddon } from "./vendor/addon-webgl/lib/addon-webgl.mjs";
import { url } from "./base.js";
import { Clipboard } from "./clipboard.js";
import { ExtraKeys, isTouchDevice } from "./extrakeys.js";
import { Files } from "./files.js";
import { InputQueue } from "./input.js";
import { StartProgress } from "./progress.js";
import { FONT_MAX, FONT_MIN, IS_MAC, loadPrefs, savePrefs } from "./prefs.js";
import { SearchBox } from "./search.js";
import { StatusBar } from "./statusbar.js";
import { followColorScheme } from "./theme.js";

const REASONS = {
  exit: "the shell exited",
  idle: "no input for too long",
  lifetime: "the session reached its maximum lifetime",
  killed: "it was ended by the gateway",
  error: "an error occurred",
};

const body = document.body;
const banner = document.getElementById("banner");
const endedBox = document.getElementById("ended");
const endedReason = document.getElementById("ended-reason");
const container = document.getElementById("terminal");
const encoder = new TextEncoder();
const defaultTitle = document.title;
const prefs = loadPrefs();

const term = new Terminal({
  allowProposedApi: true, // unicode11 and search decorations
  cursorBlink: true,
  scrollback: 5000,
  fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
  fontSize: prefs.fontSize,
  lineHeight: 1.1, // at 1.0 the DOM renderer clips underscores of common monospace fonts
  screenReaderMode: prefs.screenReader,
  macOptionIsMeta: true,
});
const fit = new FitAddon();
const search = new SearchAddon();
term.loadAddon(fit);
term.loadAddon(search);
term.loadAddon(new Unicode11Addon());
term.unicode.activeVersion = "11";
// Links open in a new tab that cannot reach back into this page (noopener), and only http(s).
term.loadAddon(new WebLinksAddon((event, uri) => {
  if (/^https?:\/\//i.test(uri)) window.open(uri, "_blank", "noopener,noreferrer");
}));
followColorScheme((name, theme) => {
  term.options.theme = theme;
  body.dataset.theme = name;
});
term.open(container);
useWebgl();
fit.fit();

// The WebGL renderer is much faster at large outputs; without WebGL (or when the GPU drops the
// context) xterm's DOM renderer takes over.
function useWebgl() {
  body.dataset.renderer = "dom";
  let webgl;
  try {
    webgl = new WebglAddon();
    term.loadAddon(webgl);
  } catch (err) {
    console.info("termbridge: WebGL unavailable, using the DOM renderer:", err && err.message);
    return;
  }
  body.dataset.renderer = "webgl";
  webgl.onContextLoss(() => {
    console.info("termbridge: WebGL context lost, using the DOM renderer");
    webgl.dispose();
    body.dataset.renderer = "dom";
  });
}

let ws = null;
let ended = false;
// The session id lives in the tab (sessionStorage): a reload resumes, a new tab starts anew.
const STORE = "termbridge.session";
let sessionId = sessionStorage.getItem(STORE);
let received = 0; // output bytes of this session received by this page
let repaint = true; // a fresh page has nothing on screen: ask for the whole buffer
let graceMs = 60000;
let droppedAt = null;
let restarting = false; // the gateway said it restarts: the session waits for us meanwhile
let retry = 0;
let retryTimer = null;
let bannerKind = "";

const status = new StatusBar();
const progress = new StartProgress(document.getElementById("start-progress"));
const input = new InputQueue(() => ws, () => body.dataset.state === "running");
const extraKeys = new ExtraKeys(document.getElementById("extra-keys"), term, typed);
const clipboard = new Clipboard(term, container, { prefs, notify });
const searchBox = new SearchBox(term, search);
const files = new Files({
  getSession: () => (body.dataset.state === "running" ? sessionId : null),
  notify,
  maxUpload: Number(body.dataset.maxUpload) || Infinity,
  term,
});

function setState(state) {
  body.dataset.state = state;
  status.setState(state);
  progress.follow(state);
}

function showBanner(text, kind = "info") {
  banner.textContent = text;
  banner.hidden = !text;
  bannerKind = text ? kind : "";
}

function notify(text) {
  showBanner(text, "notice");
  setTimeout(() => {
    if (bannerKind === "notice" && banner.textContent === text) showBanner("");
  }, 8000);
}

function send(data) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(data);
}

// Everything the person types, pastes or taps goes through here.
function typed(text) {
  if (status.idleShown) status.clearIdle();
  if (bannerKind === "idle") showBanner("");
  input.push(encoder.encode(extraKeys.transform(text)));
}

function sendResize() {
  send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
}

function forgetSession() {
  sessionId = null;
  sessionStorage.removeItem(STORE);
}

const takeBack = document.getElementById("take-back");

// `resumable`: the session runs on elsewhere (another window, or `ssh ... attach`): it can be taken back.
function showEnded(reason, message, resumable = false) {
  if (ended) return;
  ended = true;
  clearTimeout(retryTimer);
  input.clear();
  if (!resumable) forgetSession();
  takeBack.hidden = !resumable;
  setState("ended");
  body.dataset.reason = reason;
  showBanner("");
  endedReason.textContent = message || `The session ended: ${REASONS[reason] || reason}.`;
  endedBox.hidden = false;
  (resumable ? takeBack : document.getElementById("restart")).focus();
}

function onControl(msg) {
  switch (msg.type) {
    case "session":
      if (msg.id !== sessionId && received > 0) term.reset(); // the old session is gone: a new one
      if (msg.id !== sessionId) received = 0;
      sessionId = msg.id;
      sessionStorage.setItem(STORE, msg.id);
      received = msg.offset;
      if (msg.reconnect_grace) graceMs = msg.reconnect_grace * 1000;
      retry = 0;
      droppedAt = null;
      restarting = false;
      setState("running");
      body.dataset.session = msg.id;
      status.setSession(msg.id);
      status.setProfile(msg.profile);
      body.dataset.sessionProfile = msg.profile || "";
      showBanner("");
      input.pump();
      if (!searchBox.isOpen && !files.isOpen) term.focus();
      break;
    case "gap":
      term.write(`\r\n[termbridge: ${msg.lost} bytes of older output were not kept]\r\n`);
      break;
    case "idle-warning":
      showBanner(`No input for a while: this session ends in ${msg.seconds} s unless you type something.`, "idle");
      status.idleWarning(msg.seconds);
      break;
    case "exit": {
      const why = REASONS[msg.reason] || msg.reason;
      const text = msg.message ? `${msg.message[0].toUpperCase()}${msg.message.slice(1)}.` : `The session ended: ${why}.`;
      showEnded(msg.reason, msg.code !== null && msg.reason === "exit" ? `${text} Exit status ${msg.code}.` : text);
      break;
    }
    case "error":
      showBanner(msg.message, "error");
      break;
    case "restarting":
      restarting = true;
      break;
    case "viewers":
      showViewers(msg.viewers || []);
      break;
  }
}

// Admins watching or joined: always in the status bar, and a one-line banner while there are any.
const viewersStatus = document.getElementById("status-viewers");
function showViewers(viewers) {
  const names = (kind) => viewers.filter((v) => v.mode === kind).map((v) => v.user).join(", ");
  const watching = names("watch");
  const joined = names("join");
  const parts = [];
  if (watching) parts.push(`${watching} watching`);
  if (joined) parts.push(`${joined} joined (can type)`);
  viewersStatus.textContent = parts.join("; ");
  viewersStatus.hidden = parts.length === 0;
  body.dataset.viewers = String(viewers.length);
  if (parts.length) showBanner(`This session is being seen by an administrator: ${parts.join("; ")}.`, "viewers");
  else if (bannerKind === "viewers") showBanner("");
}

function socketUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const address = `${proto}//${location.host}${url("ws")}`;
  const query = new URLSearchParams();
  if (body.dataset.profile) query.set("profile", body.dataset.profile); // checked again by the gateway
  if (sessionId) {
    query.set("session", sessionId);
    query.set("offset", String(repaint ? 0 : received));
  }
  const text = query.toString();
  return text ? `${address}?${text}` : address;
}

function connect() {
  ended = false;
  endedBox.hidden = true;
  setState(droppedAt ? "reconnecting" : "connecting");
  ws = new WebSocket(socketUrl());
  ws.binaryType = "arraybuffer";
  ws.onopen = () => sendResize();
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      onControl(msg);
    } else {
      repaint = false;
      received += ev.data.byteLength;
      term.write(new Uint8Array(ev.data));
    }
  };
  ws.onclose = (ev) => {
    input.clear();
    if (ended) return;
    if (ev.code === 1012) restarting = true; // service restart: the session runs on
    if (ev.code === 4001) {
      showEnded("superseded", "This session was opened in another window or attached from ssh.", true);
      return;
    }
    if (!sessionId || ev.code === 1013) {
      showEnded("error", ev.code === 1006 ? "The connection to the gateway was lost." : "The connection closed.");
      return;
    }
    reconnect();
  };
}

function reconnect() {
  droppedAt = droppedAt || Date.now();
  if (Date.now() - droppedAt > graceMs) {
    showEnded("error", "The connection to the gateway was lost.");
    return;
  }
  setState("reconnecting");
  showBanner(restarting ? "The gateway is restarting: reconnecting…" : "Connection lost: reconnecting…", "connection");
  // A restart is over in seconds: retry at least every 2 s then, so the page is back soon after.
  const delay = Math.min(restarting ? 2000 : 5000, 250 * 2 ** retry) * (0.75 + Math.random() / 2);
  retry += 1;
  retryTimer = setTimeout(connect, delay);
}

// -- preferences: font size, copy on select, screen reader mode -----------------------------------

const fontOutput = document.getElementById("font-size");
function setFontSize(size) {
  prefs.fontSize = Math.min(FONT_MAX, Math.max(FONT_MIN, size));
  term.options.fontSize = prefs.fontSize;
  fontOutput.textContent = String(prefs.fontSize);
  savePrefs(prefs);
  fit.fit();
}
fontOutput.textContent = String(prefs.fontSize);
document.getElementById("font-smaller").addEventListener("click", () => setFontSize(prefs.fontSize - 1));
document.getElementById("font-larger").addEventListener("click", () => setFontSize(prefs.fontSize + 1));

function fontKey(ev) {
  const mod = IS_MAC ? ev.metaKey && !ev.ctrlKey : ev.ctrlKey && !ev.metaKey;
  if (!mod || ev.altKey) return false;
  if (ev.code === "Equal" || ev.code === "NumpadAdd") setFontSize(prefs.fontSize + 1);
  else if (ev.code === "Minus" || ev.code === "NumpadSubtract") setFontSize(prefs.fontSize - 1);
  else if (ev.code === "Digit0" || ev.code === "Numpad0") setFontSize(14);
  else return false;
  ev.preventDefault();
  return true;
}

function bindToggle(id, name, apply) {
  const box = document.getElementById(id);
  box.checked = prefs[name];
  box.addEventListener("change", () => {
    prefs[name] = box.checked;
    savePrefs(prefs);
    apply(box.checked);
  });
}
bindToggle("opt-copy-on-select", "copyOnSelect", () => {});
bindToggle("opt-screen-reader", "screenReader", (on) => {
  term.options.screenReaderMode = on;
});

// -- wiring -------------------------------------------------------------------------------------

// The page's own shortcuts are taken before xterm sees the key (capture phase), so none of them
// ever reaches the shell as a control character.
document.addEventListener("keydown", (ev) => {
  if (fontKey(ev) || clipboard.onKeyDown(ev) || searchBox.onKeyDown(ev)) ev.stopPropagation();
}, true);

term.onData(typed);
term.onBinary((data) => input.push(Uint8Array.from(data, (c) => c.charCodeAt(0))));
term.onResize(() => sendResize());
term.onTitleChange((title) => {
  document.title = title || defaultTitle;
});
window.addEventListener("resize", () => fit.fit());
// Phones: keep the terminal above the on-screen keyboard.
if (window.visualViewport) {
  const followViewport = () => {
    document.documentElement.style.setProperty("--app-height", `${window.visualViewport.height}px`);
    fit.fit();
  };
  window.visualViewport.addEventListener("resize", followViewport);
  followViewport();
}
if (isTouchDevice()) {
  body.classList.add("touch");
  fit.fit();
}

document.getElementById("btn-search").addEventListener("click", () => searchBox.toggle());
const confirmEnd = document.getElementById("confirm-end");
document.getElementById("btn-end").addEventListener("click", () => confirmEnd.showModal());
confirmEnd.addEventListener("close", () => {
  if (confirmEnd.returnValue === "end") send(JSON.stringify({ type: "end" }));
  else term.focus();
  confirmEnd.returnValue = "";
});
// -- sessions: attach another of the person's live sessions (browser or ssh) to this page --------

const sessionsMenu = document.getElementById("sessions");
const sessionsList = document.getElementById("sessions-list");

function attachHere(id) {
  if (ws) {
    ws.onclose = null;
    ws.onmessage = null;
    ws.close();
  }
  sessionsMenu.open = false;
  sessionId = id;
  sessionStorage.setItem(STORE, id);
  term.reset();
  received = 0;
  repaint = true;
  droppedAt = null;
  connect();
}

async function listSessions() {
  sessionsList.replaceChildren();
  let found = [];
  try {
    const resp = await fetch(url("sessions"), { credentials: "same-origin" });
    if (resp.ok) found = (await resp.json()).sessions;
  } catch {
    found = [];
  }
  for (const entry of found) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    const minutes = Math.floor(entry.idle_for / 60);
    label.textContent = `${entry.id.slice(0, 8)} · ${entry.door} · idle ${minutes} min`;
    item.append(label);
    if (entry.id === sessionId && body.dataset.state === "running") {
      item.append(" (this page)");
    } else {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "bar";
      button.textContent = "Attach here";
      button.setAttribute("aria-label", `Attach session ${entry.id.slice(0, 8)} (${entry.door}) here`);
      button.addEventListener("click", () => attachHere(entry.id));
      item.append(" ", button);
    }
    sessionsList.append(item);
  }
  if (!found.length) {
    const none = document.createElement("li");
    none.textContent = "No live sessions.";
    sessionsList.append(none);
  }
}
sessionsMenu.addEventListener("toggle", () => {
  if (sessionsMenu.open) listSessions();
  else term.focus();
});

document.getElementById("settings").addEventListener("toggle", (ev) => {
  if (!ev.target.open) term.focus();
});
takeBack.addEventListener("click", () => {
  term.reset();
  received = 0;
  repaint = true;
  droppedAt = null;
  connect();
});
document.getElementById("restart").addEventListener("click", () => {
  forgetSession();
  term.reset();
  received = 0;
  droppedAt = null;
  status.setSession(null);
  connect();
});
window.addEventListener("online", () => {
  if (droppedAt && !ended) {
    clearTimeout(retryTimer);
    connect();
  }
});

if (window.termbridgeLoaded) window.termbridgeLoaded();
connect();
