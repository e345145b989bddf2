// The status bar: connection state, the session's short id, and the idle countdown once the
// gateway has warned that the session will end for lack of input.
const LABELS = {
  connecting: "connecting…",
  running: "connected",
  reconnecting: "reconnecting…",
  ended: "ended",
};

export class StatusBar {
  constructor() {
    this.conn = document.getElementById("status-conn");
    this.sid = document.getElementById("status-session");
    this.profile = document.getElementById("status-profile");
    this.idle = document.getElementById("status-idle");
    this.endButton = document.getElementById("btn-end");
    this.idleTimer = null;
    this.idleDeadline = 0;
  }

  setState(state) {
    this.conn.textContent = LABELS[state] || state;
    this.conn.dataset.state = state;
    this.endButton.disabled = state !== "running";
    if (state === "ended") this.clearIdle();
  }

  setSession(id) {
    this.sid.textContent = id ? id.slice(0, 8) : "";
    this.sid.title = id ? `session ${id}` : "";
  }

  // The running session's profile (a resumed session keeps the one it started with).
  setProfile(name) {
    if (name) this.profile.textContent = name;
  }

  idleWarning(seconds) {
    this.idleDeadline = Date.now() + seconds * 1000;
    clearInterval(this.idleTimer);
    this.tick();
    this.idleTimer = setInterval(() => this.tick(), 1000);
  }

  tick() {
    const left = Math.max(0, Math.round((this.idleDeadline - Date.now()) / 1000));
    this.idle.textContent = `idle: ends in ${left} s`;
    this.idle.hidden = false;
    if (left === 0) clearInterval(this.idleTimer);
  }

  // The person typed: the gateway's idle clock starts over.
  clearIdle() {
    clearInterval(this.idleTimer);
    this.idleTimer = null;
    this.idle.hidden = true;
    this.idle.textContent = "";
  }

  get idleShown() {
    return this.idleTimer !== null;
  }
}
