// Keys of the one-card view, the overlay toggle, and confirmations; the forms work without it.
"use strict";

function toggleOverlay(card) {
  const img = card.querySelector("img.picture");
  const showing = img.getAttribute("src") === img.dataset.overlay;
  img.setAttribute("src", showing ? img.dataset.thumb : img.dataset.overlay);
}

function onKey(event) {
  const card = document.querySelector(".single .card");
  const typing = event.target.matches("input, select, textarea");
  if (typing) {
    if (event.key === "Escape") event.target.blur();
    return;  // Enter in the defect type submits its form as usual
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const undo = document.getElementById("undo");
  if (event.key === "u" && undo) { event.preventDefault(); undo.requestSubmit(); return; }
  if (!card) return;
  if (event.key === "g") { event.preventDefault(); card.querySelector("form.good").requestSubmit(); }
  else if (event.key === "d") { event.preventDefault(); card.querySelector("form.defect input[name=defect_type]").focus(); }
  else if (event.key === "s") { event.preventDefault(); card.querySelector("a.skip").click(); }
  else if (event.key === "o") { event.preventDefault(); toggleOverlay(card); }
}

document.addEventListener("DOMContentLoaded", () => {
  document.addEventListener("keydown", onKey);
  document.querySelectorAll("button.toggle").forEach((b) => b.addEventListener("click", () => toggleOverlay(b.closest(".card"))));
  document.querySelectorAll("form[data-confirm]").forEach((form) => form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  }));
});
