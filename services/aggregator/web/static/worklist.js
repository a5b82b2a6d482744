// Live worklist: the server pushes an event whenever a study's result changes; we re-fetch the rows
// with the same filters. Falls back to polling every 10 s when EventSource is not available.
(function () {
  "use strict";
  var table = document.querySelector("table.worklist");
  var rows = document.getElementById("rows");
  var live = document.getElementById("live");
  if (!table || !rows) return;
  var query = table.getAttribute("data-query") || "";
  function refresh() {
    fetch("/worklist/rows" + (query ? "?" + query : ""), { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        rows.innerHTML = html;
        live.textContent = "Live: updated " + new Date().toLocaleTimeString();
      })
      .catch(function () { live.textContent = "Live updates paused (reconnecting)"; });
  }
  if (window.EventSource) {
    var es = new EventSource("/worklist/events");
    es.addEventListener("worklist", refresh);
  } else {
    setInterval(refresh, 10000);
  }
})();
