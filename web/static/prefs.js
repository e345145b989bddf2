// Per-browser preferences, kept in localStorage (they outlive sessions and logins).
const KEY = "termbridge.prefs";
const DEFAULTS = { fontSize: 14, copyOnSelect: false, screenReader: false };
export const FONT_MIN = 8;
export const FONT_MAX = 32;

export function loadPrefs() {
  let stored = {};
  try {
    stored = JSON.parse(localStorage.getItem(KEY) || "{}") || {};
  } catch {
    stored = {};
  }
  const prefs = { ...DEFAULTS };
  if (Number.isInteger(stored.fontSize)) prefs.fontSize = Math.min(FONT_MAX, Math.max(FONT_MIN, stored.fontSize));
  if (typeof stored.copyOnSelect === "boolean") prefs.copyOnSelect = stored.copyOnSelect;
  if (typeof stored.screenReader === "boolean") prefs.screenReader = stored.screenReader;
  return prefs;
}

export function savePrefs(prefs) {
  try {
    localStorage.setItem(KEY, JSON.stringify(prefs));
  } catch {
    // private mode or storage full: the preference lasts for this page only
  }
}

// Apple keyboards use Cmd where others use Ctrl+Shift for the terminal's own shortcuts.
export const IS_MAC = /Mac|iPhone|iPad|iPod/.test(navigator.platform || navigator.userAgent);

// True for Ctrl+Shift+<code> (Cmd+<code> on macOS): the shortcuts that must never reach the shell.
export function isShortcut(ev, code) {
  if (ev.code !== code || ev.altKey) return false;
  if (IS_MAC && ev.metaKey && !ev.ctrlKey) return true;
  return ev.ctrlKey && ev.shiftKey && !ev.metaKey;
}
