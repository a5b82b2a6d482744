// Keyboard judging, zoom/contrast and the optional click on the opacity. The form works without JS.
(function () {
  "use strict";
  var form = document.getElementById("answer-form");
  var undo = document.getElementById("undo-form");
  var img = document.getElementById("xray");
  var zoom = 1, contrast = document.getElementById("contrast");
  function apply() {
    if (!img) return;
    img.style.transform = "scale(" + zoom + ")";
    img.style.filter = "contrast(" + (contrast ? contrast.value : 100) + "%)";
  }
  function answer(value) {
    var btn = document.getElementById("answer-" + value);
    if (value === "cant_tell") {
      var reason = document.getElementById("reason");
      if (!reason.value) { reason.focus(); reason.setAttribute("aria-invalid", "true"); return; }
    }
    if (btn) form.requestSubmit(btn);
  }
  if (img) {
    img.addEventListener("click", function (ev) {
      var r = img.getBoundingClientRect();
      var x = (ev.clientX - r.left) / r.width, y = (ev.clientY - r.top) / r.height;
      document.getElementById("click_x").value = x.toFixed(4);
      document.getElementById("click_y").value = y.toFixed(4);
      var m = document.getElementById("marker");
      m.hidden = false; m.style.left = (x * 100) + "%"; m.style.top = (y * 100) + "%";
    });
  }
  if (contrast) contrast.addEventListener("input", apply);
  var zi = document.getElementById("zoom-in"), zo = document.getElementById("zoom-out");
  if (zi) zi.addEventListener("click", function () { zoom = Math.min(zoom * 1.25, 4); apply(); });
  if (zo) zo.addEventListener("click", function () { zoom = Math.max(zoom / 1.25, 1); apply(); });
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var t = ev.target;
    if (t && (t.tagName === "INPUT" && t.type !== "radio" && t.type !== "range" || t.tagName === "TEXTAREA")) {
      if (ev.key === "Enter" && t.id === "reason") { ev.preventDefault(); answer("cant_tell"); }
      return;
    }
    var k = ev.key.toLowerCase();
    if (form) {
      if (k === "p") { ev.preventDefault(); answer("pneumonia"); return; }
      if (k === "h") { ev.preventDefault(); answer("healthy"); return; }
      if (k === "c") { ev.preventDefault(); answer("cant_tell"); return; }
      var conf = form.querySelector('input[name="confidence"][data-key="' + k + '"]');
      if (conf) { conf.checked = true; return; }
      if (k === "+" || k === "=") { zoom = Math.min(zoom * 1.25, 4); apply(); return; }
      if (k === "-") { zoom = Math.max(zoom / 1.25, 1); apply(); return; }
      if (k === "]" && contrast) { contrast.value = Math.min(+contrast.value + 15, 250); apply(); return; }
      if (k === "[" && contrast) { contrast.value = Math.max(+contrast.value - 15, 50); apply(); return; }
    }
    if (k === "u" && undo) { ev.preventDefault(); undo.requestSubmit(); }
  });
})();
