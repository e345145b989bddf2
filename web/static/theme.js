// Light and dark terminal themes, following the system's prefers-color-scheme.
export const LIGHT = {
  background: "#fbfbfa",
  foreground: "#1f2328",
  cursor: "#1f2328",
  cursorAccent: "#fbfbfa",
  selectionBackground: "#b6d6fd",
  black: "#24292f", red: "#cf222e", green: "#116329", yellow: "#7d4e00",
  blue: "#0550ae", magenta: "#8250df", cyan: "#1b7c83", white: "#6e7781",
  brightBlack: "#57606a", brightRed: "#a40e26", brightGreen: "#1a7f37", brightYellow: "#633c01",
  brightBlue: "#0969da", brightMagenta: "#a475f9", brightCyan: "#3192aa", brightWhite: "#8c959f",
};

export const DARK = {
  background: "#1e1e1e",
  foreground: "#e6e6e6",
  cursor: "#e6e6e6",
  cursorAccent: "#1e1e1e",
  selectionBackground: "#264f78",
  black: "#000000", red: "#f14c4c", green: "#23d18b", yellow: "#f5f543",
  blue: "#3b8eea", magenta: "#d670d6", cyan: "#29b8db", white: "#e5e5e5",
  brightBlack: "#666666", brightRed: "#f14c4c", brightGreen: "#23d18b", brightYellow: "#f5f543",
  brightBlue: "#3b8eea", brightMagenta: "#d670d6", brightCyan: "#29b8db", brightWhite: "#ffffff",
};

// Calls apply("light" | "dark", theme) now and whenever the system preference changes.
export function followColorScheme(apply) {
  const query = window.matchMedia("(prefers-color-scheme: dark)");
  const update = () => apply(query.matches ? "dark" : "light", query.matches ? DARK : LIGHT);
  query.addEventListener("change", update);
  update();
}
