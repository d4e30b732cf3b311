// The videoqa page: upload, follow indexing, watch, ask, stream answers, see the evidence. No build step.
const BASE = document.querySelector('meta[name="videoqa-api"]').content.replace(/\/$/, "");
const KEY = "videoqa.apiKey";
const $ = (id) => document.getElementById(id);
const state = { videos: new Map(), selected: null, conversation: null, media: null, evidence: null };

// ---- talking to the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function failure(response) {
  let code = "error", message = `${response.status} ${response.statusText}`;
  try { ({ code, message } = (await response.json()).error); } catch { /* not our error body */ }
  if (response.status === 401) askForKey();
  return new ApiError(response.status, code, message);
}

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { ...authHeaders(), ...(body ? { "Content-Type": "application/json" } : {}) };
  const response = await fetch(BASE + path, { method, headers, signal, body: body && JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
async function* events(path, signal) {
  const response = await fetch(BASE + path, { headers: authHeaders(), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { kind: "message", data: null };
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event.kind = line.slice(7);
        else if (line.startsWith("data: ")) event.data = JSON.parse(line.slice(6));
      }
      if (event.data !== null) yield event;
    }
  }
}

// A job until it finishes: its events as they come (onEvent), or long-polling when the stream fails.
async function follow(job, onEvent) {
  try {
    for await (const event of events(`/jobs/${job.id}/events`)) {
      onEvent(event);
      if (event.kind === "done") break;
    }
  } catch (error) {
    if (error instanceof ApiError && error.status !== 503) throw error;
  }
  for (;;) {  // the final record (and the fallback when streaming is unavailable)
    const current = await api(`/jobs/${job.id}?wait=10`);
    if (current.status === "succeeded" || current.status === "failed") return current;
  }
}

// ---- errors and the key -------------------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  box.textContent = error instanceof ApiError ? `${error.message} (${error.code})` : String(error.message || error);
  box.hidden = false;
}

function clearError() { $("error").hidden = true; }

function askForKey() {
  $("key-form").hidden = false;
  $("app").hidden = true;
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-form").hidden = true;
  $("app").hidden = false;
  clearError();
  refreshVideos();
});

// ---- videos -------------------------------------------------------------------------------------------

const READY_OR_FAILED = new Set(["ready", "failed"]);

async function refreshVideos() {
  try {
    const page = await api("/videos?limit=100");
    const seen = new Set();
    for (const video of page.items) { seen.add(video.id); showVideo(video); }
    for (const id of [...state.videos.keys()]) if (!seen.has(id)) removeVideo(id);
    $("no-videos").hidden = page.items.length > 0;
  } catch (error) { showError(error); }
}

function showVideo(video) {
  let entry = state.videos.get(video.id);
  if (!entry) {
    const item = $("video-item").content.firstElementChild.cloneNode(true);
    item.querySelector(".select").addEventListener("click", () => select(video.id));
    item.querySelector(".delete").addEventListener("click", () => deleteVideo(video.id));
    $("videos").prepend(item);
    entry = { item, following: false };
    state.videos.set(video.id, entry);
  }
  entry.video = video;
  const { item } = entry;
  item.dataset.status = video.status;
  item.dataset.id = video.id;
  item.querySelector(".name").textContent = video.filename;
  item.querySelector(".status").textContent = video.status === "ready" || video.status === "failed"
    ? video.status : `${video.stage} ${Math.round(video.progress * 100)}%`;
  const bar = item.querySelector("progress");
  bar.value = video.progress;
  bar.hidden = READY_OR_FAILED.has(video.status);
  item.querySelector(".reason").textContent = video.error ? `${video.error.message} (${video.error.code})` : "";
  item.classList.toggle("selected", state.selected === video.id);
  if (!READY_OR_FAILED.has(video.status) && !entry.following && video.links.index_job) watchIndexing(entry);
  if (state.selected === video.id) showVideoFacts(video);
}

async function watchIndexing(entry) {
  entry.following = true;
  const id = entry.video.id;
  const job = { id: entry.video.links.index_job.split("/").pop() };
  try {
    await follow(job, (event) => {
      if (event.kind === "progress" && state.videos.has(id)) {
        showVideo({ ...entry.video, stage: event.data.stage, progress: event.data.progress });
      }
    });
    if (state.videos.has(id)) showVideo(await api(`/videos/${id}`));
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) showError(error);  // 404: deleted meanwhile
  } finally {
    entry.following = false;
  }
}

function removeVideo(id) {
  state.videos.get(id)?.item.remove();
  state.videos.delete(id);
  if (state.selected === id) { state.selected = null; $("viewer").hidden = true; $("player").removeAttribute("src"); }
  $("no-videos").hidden = state.videos.size > 0;
}

async function deleteVideo(id) {
  try {
    await api(`/videos/${id}`, { method: "DELETE" });
    removeVideo(id);
    clearError();
  } catch (error) { showError(error); }
}

// ---- upload (XMLHttpRequest: fetch reports no upload progress) -----------------------------------------

let upload = null;

$("upload-input").addEventListener("change", () => {
  const file = $("upload-input").files[0];
  if (file) startUpload(file);
});
$("upload-cancel").addEventListener("click", () => upload?.abort());

function startUpload(file) {
  clearError();
  const xhr = new XMLHttpRequest();
  upload = xhr;
  const form = new FormData();
  form.append("file", file);
  const bar = $("upload-progress");
  bar.value = 0;
  $("upload-status").hidden = false;
  $("upload-text").textContent = `${file.name}: 0%`;
  xhr.upload.addEventListener("progress", (event) => {
    if (!event.lengthComputable) return;
    bar.value = event.loaded / event.total;
    $("upload-text").textContent = `${file.name}: ${Math.round(bar.value * 100)}% of ${formatBytes(event.total)}`;
  });
  const finish = () => { upload = null; $("upload-status").hidden = true; $("upload-input").value = ""; };
  xhr.addEventListener("load", async () => {
    finish();
    const body = JSON.parse(xhr.responseText || "null");
    if (xhr.status >= 400) {
      if (xhr.status === 401) askForKey();
      showError(new ApiError(xhr.status, body?.error?.code ?? "error", body?.error?.message ?? xhr.statusText));
      return;
    }
    showVideo(body);
    $("no-videos").hidden = true;
    select(body.id);
  });
  xhr.addEventListener("error", () => { finish(); showError(new Error("the upload failed: network error")); });
  xhr.addEventListener("abort", () => { finish(); showError(new Error(`upload of ${file.name} cancelled`)); });
  xhr.open("POST", BASE + "/videos");
  for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
  xhr.send(form);
}

// ---- the player, its seek bar and the evidence strip ----------------------------------------------------

const player = $("player");

async function select(id) {
  clearError();
  state.selected = id;
  state.conversation = null;
  state.evidence = null;
  for (const [other, entry] of state.videos) entry.item.classList.toggle("selected", other === id);
  const video = state.videos.get(id).video;
  $("viewer").hidden = false;
  $("viewer-title").textContent = video.filename;
  $("turns").replaceChildren();
  drawEvidence();
  showVideoFacts(video);
  try {
    state.media = await api(`/videos/${id}/media-token`, { method: "POST" });
    if (state.selected !== id) return;
    player.src = BASE + state.media.content_url;
    const { items } = await api(`/videos/${id}/conversations`);
    if (state.selected !== id || !items.length) return;
    state.conversation = items[0].id;  // the newest conversation continues
    for (const job of items[0].turns) showTurn(job).finish(job);
  } catch (error) { showError(error); }
}

function showVideoFacts(video) {
  const parts = [video.status];
  if (video.duration != null) parts.push(`${formatTime(video.duration)} long`);
  if (video.frames != null) parts.push(`${video.frames} frames sampled`);
  if (video.tokens_before != null) parts.push(`${video.tokens_before} → ${video.tokens_after} video tokens`);
  if (video.artifact_bytes != null) parts.push(`cache ${formatBytes(video.artifact_bytes)}`);
  if (video.error) parts.push(`failed: ${video.error.message}`);
  $("video-facts").textContent = parts.join(" · ");
}

function duration() {
  return Number.isFinite(player.duration) && player.duration > 0
    ? player.duration : state.videos.get(state.selected)?.video.duration || 0;
}

function seekTo(seconds) {
  player.currentTime = seconds;
  updateClock();
}

$("play").addEventListener("click", () => {
  if (player.paused) player.play().catch(showError);
  else player.pause();
});
player.addEventListener("play", () => { $("play").textContent = "❚❚"; $("play").ariaLabel = "Pause"; });
player.addEventListener("pause", () => { $("play").textContent = "▶"; $("play").ariaLabel = "Play"; });
for (const name of ["timeupdate", "loadedmetadata", "seeked"]) player.addEventListener(name, updateClock);
player.addEventListener("loadedmetadata", drawEvidence);
player.addEventListener("error", async () => {
  if (!player.getAttribute("src")) return;
  const id = state.selected;
  if (state.media && state.media.expires_at * 1000 <= Date.now()) {  // the signed URL ran out: renew it
    const at = player.currentTime;
    try {
      state.media = await api(`/videos/${id}/media-token`, { method: "POST" });
      if (state.selected !== id) return;
      player.src = BASE + state.media.content_url;
      player.currentTime = at;
    } catch (error) { showError(error); }
    return;
  }
  showError(new Error("the player cannot play this file"));
});
$("seek").addEventListener("input", () => seekTo((Number($("seek").value) / 1000) * duration()));
$("evidence-strip").addEventListener("click", (event) => {
  const box = event.currentTarget.getBoundingClientRect();
  seekTo(((event.clientX - box.left) / box.width) * duration());
});

function updateClock() {
  const total = duration();
  $("clock").textContent = `${formatTime(player.currentTime)} / ${formatTime(total)}`;
  if (total) $("seek").value = Math.round((player.currentTime / total) * 1000);
}

// The selected answer's attention per sampled frame, as a heat strip on the same axis as the seek bar.
function drawEvidence() {
  const strip = $("evidence-strip");
  strip.replaceChildren();
  const timeline = state.evidence?.timeline;
  const total = duration();
  if (!timeline?.length || !total) return;
  const peak = Math.max(...timeline.map(([, share]) => share)) || 1;
  timeline.forEach(([seconds, share], index) => {
    const next = index + 1 < timeline.length ? timeline[index + 1][0] : total;
    const cell = document.createElement("span");
    cell.style.left = `${(100 * seconds) / total}%`;
    cell.style.width = `${(100 * Math.max(next - seconds, 0.01)) / total}%`;
    cell.style.opacity = (0.08 + 0.92 * (share / peak)).toFixed(3);
    cell.title = `${formatTime(seconds)}: ${(100 * share).toFixed(1)}%`;
    strip.append(cell);
  });
}

// ---- asking ---------------------------------------------------------------------------------------------

$("new-chat").addEventListener("click", () => {
  state.conversation = null;
  state.evidence = null;
  $("turns").replaceChildren();
  drawEvidence();
  $("question-input").focus();
});

$("question-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("ask-form").requestSubmit(); }
});

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question-input").value.trim();
  if (!question || !state.selected) return;
  $("ask-button").disabled = true;
  try {
    if (await ask(question)) $("question-input").value = "";
  } finally {
    $("ask-button").disabled = false;
  }
});

// Ask about the selected video in its conversation; the answer streams into a new turn. Whether it was asked.
async function ask(question, mode = "cached") {
  const videoId = state.selected;
  clearError();
  try {
    const job = await api("/ask", {
      method: "POST",
      body: { video_id: videoId, question, mode, conversation_id: state.conversation ?? undefined },
    });
    state.conversation = job.conversation_id;
    const turn = showTurn(job);
    const done = await follow(job, (e) => { if (e.kind === "token") turn.append(e.data.text); });
    if (state.selected === videoId) turn.finish(done);
    return true;
  } catch (error) {
    showError(error);
    return false;
  }
}

function showTurn(job) {
  const item = $("turn").content.firstElementChild.cloneNode(true);
  const question = item.querySelector(".question");
  question.textContent = job.mode === "focused" ? `Look closer: ${job.question}` : job.question;
  const answer = item.querySelector(".answer");
  $("turns").append(item);
  return {
    append(text) { answer.textContent += text; },
    finish(done) {
      answer.textContent = done.status === "failed"
        ? `Failed: ${done.error?.message ?? "unknown error"} (${done.error?.code})` : done.answer;
      answer.classList.toggle("failed", done.status === "failed");
      answer.dataset.done = "true";
      if (done.evidence) {
        showMoments(item.querySelector(".moments"), done.evidence.moments ?? []);
        state.evidence = done.evidence;
        item.addEventListener("click", (event) => {
          if (event.target.closest("button")) return;
          state.evidence = done.evidence;
          drawEvidence();
        });
        drawEvidence();
      }
      showCacheFacts(item.querySelector(".cache"), done);
      // A closer look: the same question again, the video re-read around this answer's top moments.
      const closer = item.querySelector(".look-closer");
      closer.hidden = done.status !== "succeeded" || done.mode === "focused";
      closer.onclick = async () => {
        closer.disabled = true;
        try { await ask(done.question, "focused"); } finally { closer.disabled = false; }
      };
    },
  };
}

function showMoments(box, moments) {
  box.replaceChildren(...moments.map((moment) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "moment";
    chip.dataset.testid = "moment";
    chip.dataset.seconds = String(moment.seconds);
    const label = `${formatTime(moment.seconds, true)} · ${(100 * moment.share).toFixed(0)}%`;
    chip.ariaLabel = `Seek to ${label}`;
    const image = document.createElement("img");
    image.alt = "";
    image.src = BASE + (state.media?.frames_url.replace("{index}", moment.frame) ?? moment.thumbnail);
    image.addEventListener("error", () => image.remove());  // no thumbnail (an index made before they existed)
    const text = document.createElement("span");
    text.textContent = label;
    chip.append(image, text);
    chip.addEventListener("click", () => seekTo(moment.seconds));
    return chip;
  }));
}

function showCacheFacts(list, job) {
  const video = state.videos.get(job.video_id)?.video ?? {};
  const facts = [];
  if (job.cache) {
    facts.push(["cache", `${job.cache.hit ? "hit" : "miss"} (${job.cache.reason ?? "?"})`]);
    facts.push(["tier", job.cache.tier ?? "none"]);
  }
  const reread = job.cache?.reread;
  if (reread) {
    const windows = reread.windows.map(([from, to]) => `${formatTime(from, true)}–${formatTime(to, true)}`);
    const [width, height] = reread.frame_size;
    const frames = `${reread.frames} frames at ${reread.fps} fps, ${width}×${height}`;
    facts.push(["re-read", `${windows.join(", ")}: ${frames}`]);
  }
  if (video.tokens_before != null) facts.push(["tokens", `${video.tokens_before} → ${video.tokens_after}`]);
  if (video.artifact_bytes != null) facts.push(["artifact", formatBytes(video.artifact_bytes)]);
  if (job.history_turns) facts.push(["history", `${job.history_turns} earlier exchange(s)`]);
  if (job.timings) {  // stages a cache hit skipped are zero: left out
    facts.push(["timings", Object.entries(job.timings).filter(([, s]) => s >= 0.0005)
      .map(([stage, s]) => `${stage.replace("_", " ")} ${s.toFixed(s < 1 ? 3 : 1)}s`).join(" · ")]);
  }
  list.replaceChildren(...facts.flatMap(([name, value]) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = value;
    return [term, detail];
  }));
}

// ---- formatting -----------------------------------------------------------------------------------------

// mm:ss (h:mm:ss past an hour); with tenths for moments, which are half a second apart at 2 fps.
function formatTime(seconds, tenths = false) {
  const whole = Math.max(0, Math.floor(seconds || 0));
  const h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), s = whole % 60;
  const fraction = tenths ? `.${Math.floor(((seconds || 0) % 1) * 10)}` : "";
  const mmss = `${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}${fraction}`;
  return h ? `${h}:${mmss}` : mmss;
}

function formatBytes(bytes) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${value.toFixed(value < 10 && unit ? 1 : 0)} ${units[unit]}`;
}

// ---- start ----------------------------------------------------------------------------------------------

refreshVideos();
setInterval(() => { if (!document.hidden && $("key-form").hidden) refreshVideos(); }, 5000);
