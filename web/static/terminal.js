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

function showEnded(reason, message) {
  if (ended) return;
  ended = true;
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
      setState("running");
      body.dataset.session = msg.id;
      showBanner("");
      term.focus();
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

function connect() {
  ended = false;
  endedBox.hidden = true;
  setState("connecting");
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${proto}//${location.host}/ws`);
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
      term.write(new Uint8Array(ev.data));
    }
  };
  ws.onclose = (ev) => {
    if (!ended) showEnded("error", ev.code === 1006 ? "The connection to the gateway was lost." : "The connection closed.");
  };
}

term.onData((data) => sendInput(encoder.encode(data)));
term.onBinary((data) => sendInput(Uint8Array.from(data, (c) => c.charCodeAt(0))));
term.onResize(() => sendResize());
window.addEventListener("resize", () => fit.fit());
document.getElementById("restart").addEventListener("click", () => {
  term.reset();
  connect();
});

connect();
