// Runs before the page's modules (a classic script, so it is in place first). When the network
// changes under the browser while the page loads (Wi-Fi roaming, a laptop waking up, a VPN or
// container interface coming up: Chromium then aborts requests in flight), a module or style
// sheet fails to load and the page would stay dead. Reload it instead, a few times at most: the
// session id is kept in sessionStorage, so the reload resumes the same session.
(function () {
  var KEY = "termbridge.load-retries";
  var MAX = 3;
  window.addEventListener("error", function (ev) {
    var el = ev.target;
    if (!(el instanceof HTMLScriptElement) && !(el instanceof HTMLLinkElement)) return;
    var tries = Number(sessionStorage.getItem(KEY) || 0);
    if (tries >= MAX) {
      document.documentElement.dataset.loadFailed = "true";
      return;
    }
    sessionStorage.setItem(KEY, String(tries + 1));
    setTimeout(function () { location.reload(); }, 300 * (tries + 1));
  }, true);
  window.termbridgeLoaded = function () {
    sessionStorage.removeItem(KEY);
  };
})();
