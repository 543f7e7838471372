// modelcache dashboard: small enhancements only; every page works without this file.
"use strict";

// Copy buttons next to pull instructions: <button data-copy="#id">
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  if (!source || !navigator.clipboard) return;
  navigator.clipboard.writeText(source.textContent.trim()).then(
    () => { button.textContent = "Copied"; },
    () => { button.textContent = "Select and copy"; });
});

// Buttons that reveal their JS-free fallback are shown only when the script runs.
document.querySelectorAll("[data-js-only]").forEach((el) => { el.hidden = false; });
