// A row of keys phones and tablets lack (Esc, Tab, Ctrl, arrows, a few symbols), shown on touch
// devices. Buttons never take focus away from the terminal, so the on-screen keyboard stays up.
// Ctrl is sticky: it applies to the next key typed, on the on-screen keyboard or this row.
const SEQUENCES = {
  esc: "\x1b",
  tab: "\t",
  pipe: "|",
  tilde: "~",
  slash: "/",
  dash: "-",
};
const ARROWS = { up: "A", down: "B", right: "C", left: "D" };

export function isTouchDevice() {
  return window.matchMedia("(pointer: coarse)").matches || navigator.maxTouchPoints > 0;
}

// ^A..^Z, ^@, ^[ ... ^_ and ^? from one character; anything else passes unchanged.
export function ctrlOf(ch) {
  if (ch === "?") return "\x7f";
  if (ch === " ") return "\x00";
  const code = ch.toUpperCase().charCodeAt(0);
  if (code >= 0x40 && code <= 0x5f) return String.fromCharCode(code & 0x1f);
  return ch;
}

export class ExtraKeys {
  constructor(element, term, sendText) {
    this.term = term;
    this.sendText = sendText;
    this.ctrlButton = element.querySelector('[data-key="ctrl"]');
    this.ctrl = false;
    element.addEventListener("mousedown", (ev) => ev.preventDefault());
    element.addEventListener("click", (ev) => {
      const button = ev.target.closest("button[data-key]");
      if (!button) return;
      this.press(button.dataset.key);
      term.focus();
    });
  }

  setCtrl(on) {
    this.ctrl = on;
    this.ctrlButton.setAttribute("aria-pressed", String(on));
  }

  press(key) {
    if (key === "ctrl") {
      this.setCtrl(!this.ctrl);
      return;
    }
    if (key in ARROWS) {
      // Full-screen programs switch the arrows to application mode (ESC O A instead of ESC [ A).
      const prefix = this.term.modes.applicationCursorKeysMode ? "\x1bO" : "\x1b[";
      this.setCtrl(false);
      this.sendText(prefix + ARROWS[key]);
      return;
    }
    this.sendText(this.transform(SEQUENCES[key]));
  }

  // Applied to everything typed: a pending Ctrl turns the next single character into its control code.
  transform(data) {
    if (!this.ctrl || data.length !== 1) return data;
    this.setCtrl(false);
    return ctrlOf(data);
  }
}
