// Everything typed or pasted goes through one ordered queue to the gateway's socket, in frames of
// at most CHUNK bytes, and no faster than the socket drains: when the gateway stops reading
// (the container is busy, SSH flow control holds it), the browser's send buffer stops growing
// instead of swallowing a megabyte paste at once. Nothing is kept across a dropped socket.
const CHUNK = 16 * 1024;
const HIGH_WATER = 64 * 1024;
const POLL_MS = 20;

export class InputQueue {
  constructor(getSocket, isReady) {
    this.getSocket = getSocket;
    this.isReady = isReady;
    this.parts = [];
    this.timer = null;
  }

  push(bytes) {
    if (!bytes.length) return;
    this.parts.push(bytes);
    this.pump();
  }

  get pending() {
    return this.parts.reduce((sum, part) => sum + part.length, 0);
  }

  clear() {
    this.parts = [];
    clearTimeout(this.timer);
    this.timer = null;
  }

  later() {
    if (!this.timer) this.timer = setTimeout(() => { this.timer = null; this.pump(); }, POLL_MS);
  }

  pump() {
    if (this.timer) return;
    while (this.parts.length) {
      const ws = this.getSocket();
      if (!ws || ws.readyState === WebSocket.CLOSING || ws.readyState === WebSocket.CLOSED) {
        this.clear();
        return;
      }
      // Before the session is ready, hold input here (the gateway keeps only a little).
      if (ws.readyState === WebSocket.CONNECTING || !this.isReady() || ws.bufferedAmount > HIGH_WATER) {
        this.later();
        return;
      }
      let head = this.parts[0];
      if (head.length > CHUNK) {
        this.parts[0] = head.subarray(CHUNK);
        head = head.subarray(0, CHUNK);
      } else {
        this.parts.shift();
      }
      ws.send(head);
    }
  }
}
