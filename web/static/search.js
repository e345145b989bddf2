// Search over the scrollback with xterm's search addon: Ctrl+Shift+F (Cmd+F on macOS) opens a
// small box; Enter / Shift+Enter go to the next / previous match, Esc closes it.
import { isShortcut } from "./prefs.js";

const DECORATIONS = {
  matchBackground: "#ffd33d",
  matchBorder: "#bf8700",
  matchOverviewRuler: "#bf8700",
  activeMatchBackground: "#ff8c37",
  activeMatchBorder: "#d15704",
  activeMatchColorOverviewRuler: "#d15704",
};

export class SearchBox {
  constructor(term, addon) {
    this.term = term;
    this.addon = addon;
    this.form = document.getElementById("search");
    this.input = document.getElementById("search-input");
    this.count = document.getElementById("search-count");
    addon.onDidChangeResults(({ resultIndex, resultCount }) => {
      if (!this.input.value) this.count.textContent = "";
      else if (resultCount === 0) this.count.textContent = "no matches";
      else if (resultIndex < 0) this.count.textContent = `${resultCount}+ matches`;
      else this.count.textContent = `${resultIndex + 1} of ${resultCount}`;
    });
    this.form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.find(true);
    });
    this.input.addEventListener("input", () => this.find(true, true));
    this.input.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") {
        ev.preventDefault();
        this.close();
      } else if (ev.key === "Enter" && ev.shiftKey) {
        ev.preventDefault();
        this.find(false);
      }
    });
    document.getElementById("search-prev").addEventListener("click", () => this.find(false));
    document.getElementById("search-close").addEventListener("click", () => this.close());
  }

  onKeyDown(ev) {
    if (isShortcut(ev, "KeyF")) {
      ev.preventDefault();
      this.open();
      return true;
    }
    return false;
  }

  get isOpen() {
    return !this.form.hidden;
  }

  open() {
    this.form.hidden = false;
    const selected = this.term.getSelection();
    if (selected && !selected.includes("\n")) this.input.value = selected;
    this.input.focus();
    this.input.select();
    if (this.input.value) this.find(true, true);
  }

  toggle() {
    if (this.isOpen) this.close();
    else this.open();
  }

  close() {
    this.form.hidden = true;
    this.addon.clearDecorations();
    this.count.textContent = "";
    this.term.focus();
  }

  find(forward, incremental = false) {
    const text = this.input.value;
    if (!text) {
      this.addon.clearDecorations();
      this.count.textContent = "";
      return;
    }
    const options = { decorations: DECORATIONS, incremental };
    const found = forward ? this.addon.findNext(text, options) : this.addon.findPrevious(text, options);
    if (!found) this.count.textContent = "no matches";
  }
}
