// "starting your container… 3 s": shown while a new session's container starts, once that has
// taken more than a second (most starts are quicker, and a flash of text would only distract);
// hidden as soon as the session runs, ends or the connection drops.
const SHOW_AFTER_MS = 1000;

export class StartProgress {
  constructor(element) {
    this.el = element;
    this.timer = null;
    this.since = 0;
  }

  // Called with every page state: "connecting" is the wait for a session.
  follow(state) {
    if (state === "connecting") this.start();
    else this.stop();
  }

  start() {
    if (this.timer !== null) return;
    this.since = Date.now();
    this.timer = setInterval(() => this.tick(), 250);
  }

  tick() {
    const waited = Date.now() - this.since;
    if (waited < SHOW_AFTER_MS) return;
    this.el.textContent = `starting your container… ${Math.floor(waited / 1000)} s`;
    this.el.hidden = false;
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.el.hidden = true;
    this.el.textContent = "";
  }
}
