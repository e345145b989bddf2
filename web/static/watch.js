// An admin's view of someone's session (admin/watch/ID, admin/join/ID): xterm.js fed by the
// view's socket (same path + "/ws"). The view takes the session's size, never sets it. Watching,
// the terminal takes no input; joined, what the admin types goes to the shell.
import "./csp.js";
import { Terminal } from "./vendor/xterm/lib/xterm.mjs";
import { followColorScheme } from "./theme.js";

const body = document.body;
const mode = body.dataset.mode;
const owner = body.dataset.owner;
const banner = document.getElementById("watch-banner");
const conn = document.getElementById("status-conn");
const encoder = new TextEncoder();

const term = new Terminal({
  cursorBlink: mode === "join",
  disableStdin: mode !== "join",
  scrollback: 5000,
  fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
  fontSize: 14,
  lineHeight: 1.1,
});
followColorScheme((name, theme) => {
  term.options.theme = theme;
  body.dataset.theme = name;
});
const workspace = document.querySelector(".workspace");
term.open(document.getElementById("terminal"));

// The view has the session's size in cells: the font shrinks (down to FONT_MIN) until it fits.
const FONT_MAX = 14;
const FONT_MIN = 7;
function resizeTo(cols, rows) {
  term.resize(cols, rows);
  term.options.fontSize = FONT_MAX;
  const screen = term.element.querySelector(".xterm-screen");
  while (term.options.fontSize > FONT_MIN
    && (screen.offsetWidth > workspace.clientWidth - 8 || screen.offsetHeight > workspace.clientHeight - 8)) {
    term.options.fontSize -= 1;
  }
}
window.addEventListener("resize", () => resizeTo(term.cols, term.rows));

const HEADLINE = {
  watch: `Watching ${owner}'s session, read-only. ${owner} sees that you are watching.`,
  join: `Joined ${owner}'s session: what you type goes to the shell, recorded as yours. ${owner} sees that you joined.`,
};
banner.textContent = HEADLINE[mode] || "";

function setState(state, text) {
  body.dataset.state = state;
  conn.dataset.state = state;
  conn.textContent = text || state;
}

function socketUrl() {
  const url = new URL(location.pathname.replace(/\/+$/, "") + "/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

const ws = new WebSocket(socketUrl());
ws.binaryType = "arraybuffer";
let received = 0;

ws.onmessage = (ev) => {
  if (typeof ev.data !== "string") {
    received += ev.data.byteLength;
    body.dataset.received = String(received);
    term.write(new Uint8Array(ev.data));
    return;
  }
  let msg;
  try {
    msg = JSON.parse(ev.data);
  } catch {
    return;
  }
  switch (msg.type) {
    case "watch":
      resizeTo(msg.cols, msg.rows);
      setState("running", mode === "join" ? "joined" : "watching");
      if (mode === "join") term.focus();
      break;
    case "size":
      resizeTo(msg.cols, msg.rows);
      break;
    case "gap":
      term.write(`\r\n[termbridge: this view skipped ${msg.lost} bytes it could not keep up with]\r\n`);
      break;
    case "error":
      banner.textContent = msg.message;
      break;
    case "exit":
      setState("ended", "session ended");
      banner.textContent = `${owner}'s session ended.`;
      break;
  }
};
ws.onclose = (ev) => {
  if (body.dataset.state === "ended") return;
  setState("ended", "closed");
  banner.textContent = ev.code === 4003
    ? "You are no longer allowed to watch sessions."
    : "The view closed: the session ended or the connection was lost.";
};

if (mode === "join") {
  term.onData((text) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(text));
  });
  term.onBinary((data) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(Uint8Array.from(data, (c) => c.charCodeAt(0)));
  });
}
