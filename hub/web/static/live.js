// Live refresh of the node list (polls its JSON view and replaces the table's rows),
// and confirmation for dangerous buttons. The pages work without it.
"use strict";
(function () {
  function cell(row, text, cls) {
    var td = document.createElement("td");
    if (cls) {
      var span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      td.appendChild(span);
    } else {
      td.textContent = text;
    }
    row.appendChild(td);
    return td;
  }

  function render(data) {
    var body = document.querySelector("#node-table tbody");
    if (!body) return;
    var rows = document.createDocumentFragment();
    data.nodes.forEach(function (n) {
      var tr = document.createElement("tr");
      var name = document.createElement("td");
      var a = document.createElement("a");
      a.href = "/nodes/" + encodeURIComponent(n.name);
      a.textContent = n.name;
      name.appendChild(a);
      tr.appendChild(name);
      cell(tr, n.state, "state " + n.state);
      var online = cell(tr, n.online ? "online" : "offline");
      var dot = document.createElement("span");
      dot.className = "dot " + (n.online ? "online" : "offline");
      online.insertBefore(dot, online.firstChild);
      var fwd = Object.keys(n.forwards).map(function (s) { return s + "=" + n.forwards[s]; });
      cell(tr, fwd.join(" ") || "-");
      cell(tr, n.public ? "on" : "off");
      cell(tr, n.last_seen);
      cell(tr, n.monitoring, "mon " + n.monitoring.toLowerCase());
      rows.appendChild(tr);
    });
    body.replaceChildren(rows);
    var count = document.getElementById("count");
    if (count) count.textContent = data.total + (data.total === 1 ? " node" : " nodes");
  }

  function poll(src) {
    fetch(src, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (r.status === 401) { window.location = "/signin"; return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (data) { if (data) render(data); })
      .catch(function () { /* the hub restarts: try again next time */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.getElementById("live");
    if (live && live.dataset.src) {
      setInterval(function () { poll(live.dataset.src); }, 3000);
    }
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (e) {
        if (!window.confirm(form.dataset.confirm)) e.preventDefault();
      });
    });
  });
})();
