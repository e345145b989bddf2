// The gateway's base path (web.base_path, e.g. "/terminal/" behind a proxy): every URL a page
// builds goes through url(). This module is served at <base>static/base.js, so the base is the
// directory above it: nothing needs to be injected into the page.
export const BASE = new URL("../", import.meta.url).pathname;

// `path` under the base: url("ws") is "/terminal/ws"; a leading "/" is ignored.
export function url(path) {
  return BASE + String(path).replace(/^\/+/, "");
}
