// Copy and paste: Ctrl+Shift+C / Ctrl+Shift+V (Cmd+C / Cmd+V on macOS), right-click paste,
// and copy-on-select as an option. Pastes go through xterm's paste(), which adds the bracketed
// paste markers when the program asked for them (bash does) and turns newlines into Enter.
import { IS_MAC, isShortcut } from "./prefs.js";

async function writeClipboard(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // fall through to the old way (e.g. the document lost focus)
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

export class Clipboard {
  constructor(term, element, { prefs, notify }) {
    this.term = term;
    this.element = element;
    this.prefs = prefs;
    this.notify = notify;
    this.selectTimer = null;
    element.addEventListener("contextmenu", (ev) => {
      if (ev.shiftKey) return; // Shift+right-click keeps the browser's own menu
      ev.preventDefault();
      this.pasteFromClipboard();
    });
    term.onSelectionChange(() => {
      if (!this.prefs.copyOnSelect) return;
      // A drag changes the selection many times: copy once it settles.
      clearTimeout(this.selectTimer);
      this.selectTimer = setTimeout(() => {
        if (term.hasSelection()) writeClipboard(term.getSelection());
      }, 150);
    });
  }

  // Called for every keydown on the page before xterm sees it; true: handled, keep it from the shell.
  onKeyDown(ev) {
    // Elsewhere on the page (the search box, the Files panel) the browser's own copy/paste rule.
    if (!this.element.contains(ev.target)) return false;
    if (isShortcut(ev, "KeyC")) {
      ev.preventDefault();
      this.copySelection();
      return true;
    }
    if (isShortcut(ev, "KeyV")) {
      // Left to the browser: its native paste event reaches xterm (which handles it) without
      // asking for clipboard permission. Only xterm's own key handling is skipped, so the shell
      // never receives a stray ^V.
      return true;
    }
    return false;
  }

  async copySelection() {
    const text = this.term.getSelection();
    if (!text) return false;
    const ok = await writeClipboard(text);
    if (!ok) this.notify("The browser did not allow copying to the clipboard.");
    return ok;
  }

  async pasteFromClipboard() {
    let text;
    try {
      text = await navigator.clipboard.readText();
    } catch {
      const keys = IS_MAC ? "Cmd+V" : "Ctrl+Shift+V";
      this.notify(`The browser did not allow reading the clipboard here: paste with ${keys}, or allow clipboard access for this site.`);
      return;
    }
    if (text) this.term.paste(text);
    this.term.focus();
  }
}
