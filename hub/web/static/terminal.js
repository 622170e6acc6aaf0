// The web terminal (docs/web-terminal.md): xterm.js on the page's WebSocket.
// Binary messages are terminal bytes both ways; text messages are JSON control:
// {"resize": [cols, rows]} to the hub, {"exit": status} or {"error": "why"} from it.
// Loaded with `defer` after xterm.js and addon-fit.js, which define Terminal and FitAddon.
"use strict";
(function () {
  const box = document.getElementById("terminal");
  const term = new Terminal({ cursorBlink: true, scrollback: 5000, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  term.focus();

  const url = new URL(box.dataset.socket, window.location.href);
  url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("cols", String(term.cols));
  url.searchParams.set("rows", String(term.rows));
  const socket = new WebSocket(url.href);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  let ended = false;

  function notice(text) {
    term.write("\r\n\x1b[7m " + text.replace(/[\x00-\x1f\x7f]/g, " ") + " \x1b[0m\r\n");
    document.title = text + " — " + document.title;
  }

  function send(data) {
    if (socket.readyState === WebSocket.OPEN) {
      socket.send(data);
    }
  }

  socket.addEventListener("message", function (event) {
    if (typeof event.data !== "string") {
      term.write(new Uint8Array(event.data));
      return;
    }
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (e) {
      return;
    }
    if (ended) {
      return;
    }
    if (typeof message.error === "string") {
      ended = true;
      notice(message.error);
    } else if ("exit" in message) {
      ended = true;
      notice(message.exit === null ? "ended by signal " + message.signal
                                   : "exit status " + message.exit);
    }
  });
  socket.addEventListener("close", function () {
    if (!ended) {
      ended = true;
      notice("connection closed");
    }
  });

  term.onData(function (data) { send(encoder.encode(data)); });
  term.onBinary(function (data) {
    const bytes = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i += 1) {
      bytes[i] = data.charCodeAt(i) & 0xff;
    }
    send(bytes);
  });
  term.onResize(function (size) { send(JSON.stringify({ resize: [size.cols, size.rows] })); });
  window.addEventListener("resize", function () { fit.fit(); });
})();
