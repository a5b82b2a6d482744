// Image controls: zoom, brightness/contrast (CSS filters on the rendered X-ray), heatmap overlay.
(function () {
  "use strict";
  document.querySelectorAll("section.image").forEach(function (sec) {
    var xray = sec.querySelector("img.xray");
    var heat = sec.querySelector("img.heatmap");
    var stage = sec.querySelector(".stage");
    var zoom = sec.querySelector(".zoom"), bright = sec.querySelector(".brightness"), contrast = sec.querySelector(".contrast");
    var toggle = sec.querySelector(".heat-toggle"), opacity = sec.querySelector(".heat-opacity");
    function apply() {
      stage.style.transform = "scale(" + zoom.value + ")";
      if (xray) xray.style.filter = "brightness(" + bright.value + ") contrast(" + contrast.value + ")";
      if (heat) {
        heat.style.display = toggle && toggle.checked ? "block" : "none";
        heat.style.opacity = opacity ? opacity.value : 0.4;
      }
    }
    [zoom, bright, contrast, toggle, opacity].forEach(function (el) { if (el) el.addEventListener("input", apply); });
    sec.querySelector(".reset").addEventListener("click", function () {
      zoom.value = 1; bright.value = 1; contrast.value = 1; if (opacity) opacity.value = 0.4; if (toggle) toggle.checked = true;
      apply();
    });
    apply();
  });
})();
