// termbridge terminal page: xterm.js wired to /ws (binary frames: terminal bytes; text: JSON control).
import "/static/csp.js";
import { Terminal } from "/static/vendor/xterm/lib/xterm.mjs";
import { FitAddon } from "/static/vendor/addon-fit/lib/addon-fit.mjs";

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
const encoder = new TextEncoder();

const term = new Terminal({
  cursorBlink: true,
  scrollback: 5000,
  fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
  fontSize: 14,
});
const fit = new FitAddon();
term.loadAddon(fit);
term.open(document.getElementById("terminal"));
fit.fit();

let ws = null;
let ended = false;
// The session id lives in the tab (sessionStorage): a reload resumes, a new tab starts anew.
const STORE = "termbridge.session";
let sessionId = sessionStorage.getItem(STORE);
let received = 0; // output bytes of this session received by this page
let repaint = true; // a fresh page has nothing on screen: ask for the whole buffer
let graceMs = 60000;
let droppedAt = null;
let retry = 0;
let retryTimer = null;

function setState(state) {
  body.dataset.state = state;
}

function showBanner(text) {
  banner.textContent = text;
  banner.hidden = !text;
}

function send(data) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(data);
}

// A paste may be megabytes: it goes in frames far below the server's message limit
// (web.max_message_size), and the server takes each one only as fast as the shell reads.
const INPUT_CHUNK = 64 * 1024;

function sendInput(bytes) {
  for (let i = 0; i < bytes.length; i += INPUT_CHUNK) send(bytes.subarray(i, i + INPUT_CHUNK));
}

function sendResize() {
  send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
}

function forgetSession() {
  sessionId = null;
  sessionStorage.removeItem(STORE);
}

function showEnded(reason, message) {
  if (ended) return;
  ended = true;
  clearTimeout(retryTimer);
  forgetSession();
  setState("ended");
  body.dataset.reason = reason;
  showBanner("");
  endedReason.textContent = message || `The session ended: ${REASONS[reason] || reason}.`;
  endedBox.hidden = false;
  document.getElementById("restart").focus();
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
      setState("running");
      body.dataset.session = msg.id;
      showBanner("");
      term.focus();
      break;
    case "gap":
      term.write(`\r\n[termbridge: ${msg.lost} bytes of older output were not kept]\r\n`);
      break;
    case "idle-warning":
      showBanner(`No input for a while: this session ends in ${msg.seconds} s unless you type something.`);
      break;
    case "exit": {
      const why = REASONS[msg.reason] || msg.reason;
      const text = msg.message ? `${msg.message}.` : `The session ended: ${why}.`;
      showEnded(msg.reason, msg.code !== null && msg.reason === "exit" ? `${text} Exit status ${msg.code}.` : text);
      break;
    }
    case "error":
      showBanner(msg.message);
      break;
  }
}

function socketUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  let url = `${proto}//${location.host}/ws`;
  if (sessionId) url += `?session=${encodeURIComponent(sessionId)}&offset=${repaint ? 0 : received}`;
  return url;
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
    if (ended) return;
    if (ev.code === 4001) {
      showEnded("error", "This session was opened in another window.");
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
  showBanner("Connection lost: reconnecting…");
  const delay = Math.min(5000, 250 * 2 ** retry) * (0.75 + Math.random() / 2);
  retry += 1;
  retryTimer = setTimeout(connect, delay);
}

term.onData((data) => sendInput(encoder.encode(data)));
term.onBinary((data) => sendInput(Uint8Array.from(data, (c) => c.charCodeAt(0))));
term.onResize(() => sendResize());
window.addEventListener("resize", () => fit.fit());
document.getElementById("restart").addEventListener("click", () => {
  term.reset();
  received = 0;
  droppedAt = null;
  connect();
});
window.addEventListener("online", () => {
  if (droppedAt && !ended) {
    clearTimeout(retryTimer);
    connect();
  }
});

connect();
