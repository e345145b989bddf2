// Lets xterm.js render under the page's strict Content-Security-Policy (no 'unsafe-inline').
// xterm.js styles the terminal at run time in two ways that CSP treats as inline style:
// - it creates <style> elements: each one gets this page's nonce (read from the module script
//   tag; the server makes a new one per page), which the policy admits;
// - it sets `style` attributes (true-colour cells): those become CSSOM writes (style.cssText),
//   which CSP does not govern, with the same effect.
// Imported first by terminal.js, so it runs before any terminal exists.
const nonce = document.querySelector("script[nonce]")?.nonce;

if (nonce) {
  const createElement = Document.prototype.createElement;
  Document.prototype.createElement = function (name, options) {
    const element = createElement.call(this, name, options);
    if (String(name).toLowerCase() === "style") element.nonce = nonce;
    return element;
  };
}

const setAttribute = Element.prototype.setAttribute;
Element.prototype.setAttribute = function (name, value) {
  if (String(name).toLowerCase() === "style" && this.style !== undefined) {
    this.style.cssText = String(value);
    return;
  }
  setAttribute.call(this, name, value);
};
