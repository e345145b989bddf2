// Plays one recording (asciicast v2, fetched from the gateway) with asciinema-player, loaded as
// a classic script from /static (never a CDN); light or dark like the other pages.
const element = document.getElementById("player");
const dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
try {
  window.AsciinemaPlayer.create(new URL(element.dataset.src, document.baseURI).href, element, {
    autoPlay: true,
    idleTimeLimit: 1,
    fit: "width",
    theme: dark ? "asciinema" : "solarized-light",
  });
  element.dataset.ready = "true";
} catch (err) {
  const box = document.getElementById("player-error");
  box.textContent = `The player could not start: ${err}`;
  box.hidden = false;
}
