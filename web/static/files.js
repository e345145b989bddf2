// Files in the session's home directory: uploads (Upload button, or drag-and-drop anywhere on the
// page) with a progress bar each, and a Files panel that lists a directory and downloads a file
// with one click. The gateway streams both ways over SFTP into the session's container.

import { url } from "./base.js";

export function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = -1;
  do {
    value /= 1024;
    unit += 1;
  } while (value >= 1024 && unit < units.length - 1);
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

const UPLOAD_RETRIES = 2;
const RETRY_WAIT_MS = 15000;

function joinPath(dir, name) {
  return dir ? `${dir}/${name}` : name;
}

function query(params) {
  return new URLSearchParams(params).toString();
}

function errorText(xhrOrResponseText, fallback) {
  try {
    const body = JSON.parse(xhrOrResponseText);
    if (body && typeof body.error === "string") return body.error;
  } catch {
    // not JSON: a proxy's page, or nothing at all
  }
  return fallback;
}

export class Files {
  constructor({ getSession, notify, maxUpload, term }) {
    this.getSession = getSession;
    this.notify = notify;
    this.maxUpload = maxUpload;
    this.term = term;
    this.dir = "";
    this.panel = document.getElementById("files");
    this.list = document.getElementById("files-list");
    this.pathLabel = document.getElementById("files-path");
    this.error = document.getElementById("files-error");
    this.upButton = document.getElementById("files-up");
    this.showHidden = document.getElementById("files-show-hidden");
    this.toggleButton = document.getElementById("btn-files");
    this.uploads = document.getElementById("uploads");
    this.dropzone = document.getElementById("dropzone");
    this.input = document.getElementById("upload-input");
    this.entries = [];
    this.queue = Promise.resolve();

    this.toggleButton.addEventListener("click", () => this.toggle());
    document.getElementById("files-close").addEventListener("click", () => this.close());
    document.getElementById("files-refresh").addEventListener("click", () => this.load(this.dir));
    this.upButton.addEventListener("click", () => this.load(this.dir.split("/").slice(0, -1).join("/")));
    this.showHidden.addEventListener("change", () => this.render());
    this.panel.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") this.close();
    });
    document.getElementById("btn-upload").addEventListener("click", () => this.input.click());
    this.input.addEventListener("change", () => {
      this.uploadAll([...this.input.files]);
      this.input.value = "";
    });
    this.installDrop();
  }

  // -- the panel ------------------------------------------------------------------------------

  get isOpen() {
    return !this.panel.hidden;
  }

  toggle() {
    if (this.isOpen) this.close();
    else this.open();
  }

  open() {
    this.panel.hidden = false;
    this.toggleButton.setAttribute("aria-expanded", "true");
    this.load(this.dir);
  }

  close() {
    this.panel.hidden = true;
    this.toggleButton.setAttribute("aria-expanded", "false");
    this.term.focus();
  }

  async load(dir) {
    const session = this.getSession();
    if (!session) {
      this.error.textContent = "No session is connected.";
      return;
    }
    this.error.textContent = "";
    this.panel.setAttribute("aria-busy", "true");
    try {
      const address = url(`files?${query({ session, path: dir })}`);
      // one retry: a network change aborts requests in flight
      const response = await fetch(address, { credentials: "same-origin" }).catch(() => fetch(address, { credentials: "same-origin" }));
      const text = await response.text();
      if (!response.ok) {
        this.error.textContent = errorText(text, `Listing failed (${response.status}).`);
        return;
      }
      const listing = JSON.parse(text);
      this.dir = listing.path;
      this.display = listing.display;
      this.entries = listing.entries;
      this.truncated = listing.truncated;
      this.render();
    } catch {
      this.error.textContent = "The gateway could not be reached.";
    } finally {
      this.panel.removeAttribute("aria-busy");
    }
  }

  render() {
    const session = this.getSession();
    this.pathLabel.textContent = this.display || "~";
    this.upButton.disabled = !this.dir;
    document.getElementById("dropzone-target").textContent = this.display || "~";
    const shown = this.entries.filter((e) => this.showHidden.checked || !e.name.startsWith("."));
    const items = shown.map((entry) => {
      const li = document.createElement("li");
      const kind = entry.type === "link" ? entry.target : entry.type;
      li.className = `entry entry-${kind}`;
      if (kind === "dir") {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "entry-name";
        button.textContent = `${entry.name}/`;
        button.addEventListener("click", () => this.load(joinPath(this.dir, entry.name)));
        li.append(button);
      } else if (kind === "file") {
        const link = document.createElement("a");
        link.className = "entry-name";
        link.href = url(`files/download?${query({ session, path: joinPath(this.dir, entry.name) })}`);
        link.download = entry.name;
        link.textContent = entry.name;
        link.title = `Download ${entry.name}`;
        const size = document.createElement("span");
        size.className = "entry-size";
        size.textContent = formatSize(entry.size);
        li.append(link, size);
      } else {
        const span = document.createElement("span");
        span.className = "entry-name";
        span.textContent = entry.name;
        li.append(span);
      }
      if (entry.type === "link") li.title = "symbolic link";
      return li;
    });
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "entry-empty";
      li.textContent = "(empty)";
      items.push(li);
    }
    if (this.truncated) {
      const li = document.createElement("li");
      li.className = "entry-empty";
      li.textContent = "(more entries not shown)";
      items.push(li);
    }
    this.list.replaceChildren(...items);
  }

  // -- uploads --------------------------------------------------------------------------------

  installDrop() {
    let depth = 0;
    const hasFiles = (ev) => ev.dataTransfer && [...ev.dataTransfer.types].includes("Files");
    window.addEventListener("dragenter", (ev) => {
      if (!hasFiles(ev)) return;
      ev.preventDefault();
      depth += 1;
      this.dropzone.hidden = false;
    });
    window.addEventListener("dragover", (ev) => {
      if (!hasFiles(ev)) return;
      ev.preventDefault();
      ev.dataTransfer.dropEffect = "copy";
    });
    window.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) this.dropzone.hidden = true;
    });
    window.addEventListener("drop", (ev) => {
      if (!hasFiles(ev)) return;
      ev.preventDefault();
      depth = 0;
      this.dropzone.hidden = true;
      const files = [];
      const items = ev.dataTransfer.items ? [...ev.dataTransfer.items] : [];
      for (const [i, file] of [...ev.dataTransfer.files].entries()) {
        const entry = items[i] && items[i].webkitGetAsEntry ? items[i].webkitGetAsEntry() : null;
        if (entry && entry.isDirectory) this.notify(`${file.name} is a folder: folders cannot be uploaded (zip it first).`);
        else files.push(file);
      }
      this.uploadAll(files);
    });
  }

  // One at a time, in order: several large uploads at once only compete for the same link.
  uploadAll(files) {
    for (const file of files) {
      const row = this.addRow(file);
      this.queue = this.queue.then(() => this.upload(file, this.dir, row));
    }
  }

  // Whether `session` is (again) the connected one within a few seconds (the page may be
  // reconnecting after the same network change).
  async sameSessionBack(session) {
    for (let waited = 0; waited < RETRY_WAIT_MS; waited += 250) {
      await new Promise((done) => setTimeout(done, 250));
      const current = this.getSession();
      if (current === session) return true;
      if (current) return false;
    }
    return false;
  }

  addRow(file) {
    const li = document.createElement("li");
    li.className = "upload";
    li.dataset.status = "waiting";
    li.dataset.name = file.name;
    const name = document.createElement("span");
    name.className = "upload-name";
    name.textContent = file.name;
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = 0;
    bar.setAttribute("aria-label", `Uploading ${file.name}`);
    const message = document.createElement("span");
    message.className = "upload-message";
    message.textContent = `waiting (${formatSize(file.size)})`;
    const dismiss = document.createElement("button");
    dismiss.type = "button";
    dismiss.className = "icon";
    dismiss.setAttribute("aria-label", `Dismiss ${file.name}`);
    dismiss.textContent = "\u00d7";
    dismiss.addEventListener("click", () => li.remove());
    li.append(name, bar, message, dismiss);
    this.uploads.append(li);
    return { li, bar, message };
  }

  finish(row, status, text) {
    row.li.dataset.status = status;
    row.message.textContent = text;
    if (status === "done") {
      row.bar.value = 1;
      setTimeout(() => row.li.remove(), 8000);
    } else {
      row.li.setAttribute("role", "alert");
    }
  }

  upload(file, dir, row) {
    const session = this.getSession();
    if (!session) {
      this.finish(row, "error", "failed: no session is connected");
      return Promise.resolve();
    }
    if (file.size > this.maxUpload) {
      this.finish(row, "error", `too large: the limit is ${formatSize(this.maxUpload)}`);
      return Promise.resolve();
    }
    return this.send(file, dir, session, row, UPLOAD_RETRIES);
  }

  // A network change aborts requests in flight (the gateway discards the partial upload): try
  // again a couple of times before reporting the failure.
  send(file, dir, session, row, retries) {
    row.li.dataset.status = "uploading";
    row.bar.value = 0;
    row.message.textContent = `0 of ${formatSize(file.size)}`;
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", url(`files/upload?${query({ session, path: joinPath(dir, file.name) })}`));
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.upload.addEventListener("progress", (ev) => {
        if (!ev.lengthComputable) return;
        row.bar.value = ev.total ? ev.loaded / ev.total : 1;
        row.message.textContent = `${formatSize(ev.loaded)} of ${formatSize(ev.total)}`;
      });
      xhr.addEventListener("load", () => {
        if (xhr.status === 201) {
          const body = JSON.parse(xhr.responseText);
          this.finish(row, "done", `uploaded to ${body.path}`);
          if (this.isOpen) this.load(this.dir);
        } else {
          this.finish(row, "error", `failed: ${errorText(xhr.responseText, `error ${xhr.status}`)}`);
        }
        resolve();
      });
      xhr.addEventListener("error", () => {
        if (retries > 0) {
          row.message.textContent = "the connection broke; trying again…";
          resolve(this.sameSessionBack(session).then((back) => {
            if (back) return this.send(file, dir, session, row, retries - 1);
            this.finish(row, "error", "failed: the connection to the gateway broke");
            return undefined;
          }));
          return;
        }
        this.finish(row, "error", "failed: the connection to the gateway broke");
        resolve();
      });
      xhr.send(file);
    });
  }
}
