// scribefarm's dashboard: one live stream per page, the upload with its progress bar,
// and the audio player that follows the transcript. Plain JavaScript, no build step.
"use strict";

function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

// --- live updates: the server sends {"element id": "its new HTML"} for what changed ---

function listen() {
  const url = document.body.dataset.events;
  if (!url) return;
  const source = new EventSource(url);
  source.addEventListener("fragments", (event) => swap(JSON.parse(event.data)));
  source.addEventListener("reload", () => {
    source.close(); // the page itself says why (signed out, deleted, ...)
    location.reload();
  });
  window.addEventListener("pagehide", () => source.close());
}

function swap(fragments) {
  const focused = document.activeElement && document.activeElement.id;
  for (const [id, html] of Object.entries(fragments)) {
    const target = document.getElementById(id);
    if (target) target.innerHTML = html;
  }
  // A keyboard user keeps their place when the element they were on is redrawn.
  if (focused && document.activeElement === document.body) {
    document.getElementById(focused)?.focus();
  }
  highlight();
}

// --- upload, with a progress bar ------------------------------------------------------

function upload(form) {
  const bar = form.querySelector("progress");
  const status = form.querySelector(".status");
  const button = form.querySelector("button");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const request = new XMLHttpRequest();
    request.open("POST", form.action);
    request.setRequestHeader("X-CSRF-Token", csrfToken());
    request.setRequestHeader("Accept", "application/json");
    request.responseType = "json";
    request.upload.addEventListener("progress", (progress) => {
      if (!progress.lengthComputable) return;
      bar.value = (100 * progress.loaded) / progress.total;
      status.textContent = `Uploading… ${Math.floor(bar.value)} %`;
    });
    request.addEventListener("load", () => {
      if (request.status === 201) {
        status.textContent = "Uploaded: opening it…";
        location.assign(request.response.url);
      } else {
        failed(request.response?.message || `The upload failed (HTTP ${request.status}).`);
      }
    });
    request.addEventListener("error", () => failed("The upload failed: the server could not be reached."));
    status.classList.remove("problem");
    status.textContent = "Uploading… 0 %";
    bar.value = 0;
    bar.hidden = false;
    button.disabled = true;
    request.send(formData(form));
  });

  function failed(message) {
    status.textContent = message;
    status.classList.add("problem");
    bar.hidden = true;
    button.disabled = false;
  }
}

function formData(form) {
  // Options first, the file last; empty options are left out (the server's defaults).
  const data = new FormData();
  const file = form.querySelector('input[type="file"]');
  for (const [name, value] of new FormData(form)) {
    if (name !== file.name && value !== "") data.append(name, value);
  }
  data.append(file.name, file.files[0]);
  return data;
}

// A speaker count means nothing unless speakers are told apart: the field follows the box
// (a disabled field is not sent). Without this script the server says what is wrong.
function speakerOptions() {
  for (const box of document.querySelectorAll('input[name="diarize"]')) {
    const count = box.form.querySelector('input[name="num_speakers"]');
    const follow = () => { count.disabled = !box.checked; };
    box.addEventListener("change", follow);
    follow();
  }
}

// --- the audio player and the transcript ------------------------------------------------

function player() {
  const audio = document.getElementById("player");
  const transcript = document.getElementById("transcript");
  if (!audio || !transcript) return;
  transcript.addEventListener("click", (event) => {
    const segment = event.target.closest(".segment");
    if (!segment) return;
    audio.currentTime = Number(segment.dataset.start);
    audio.play().catch(() => {}); // the player's own controls say why, if it cannot
  });
  audio.addEventListener("timeupdate", highlight);
  audio.addEventListener("seeked", highlight);
}

function highlight() {
  const audio = document.getElementById("player");
  if (!audio) return;
  const now = audio.currentTime;
  const started = !audio.paused || now > 0; // nothing is "current" before playing
  for (const segment of document.querySelectorAll("#transcript .segment")) {
    const start = Number(segment.dataset.start);
    const current = started && now >= start && now < Number(segment.dataset.end);
    if (current === segment.classList.contains("current")) continue;
    segment.classList.toggle("current", current);
    if (current) {
      segment.setAttribute("aria-current", "true");
      keepInView(segment);
    } else {
      segment.removeAttribute("aria-current");
    }
  }
}

function keepInView(segment) {
  const box = document.getElementById("transcript");
  const top = segment.offsetTop;
  if (top < box.scrollTop || top + segment.offsetHeight > box.scrollTop + box.clientHeight) {
    box.scrollTop = top - box.clientHeight / 3;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  listen();
  player();
  speakerOptions();
  const form = document.getElementById("upload");
  if (form) upload(form);
});
