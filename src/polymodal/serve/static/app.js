// polymodal's web page: plain JS over the HTTP API (no build step).
"use strict";

const KEY = "polymodal_key";

// <img> requests cannot carry a header: the key they need travels as a cookie
function keyCookie(key) {
  document.cookie = KEY + "=" + encodeURIComponent(key) + "; path=/; SameSite=Strict";
}
if (localStorage.getItem(KEY)) keyCookie(localStorage.getItem(KEY));

// fetch with the API key (asked for once when the server answers 401, then remembered)
async function api(path, options = {}, retried = false) {
  const headers = Object.assign({}, options.headers || {});
  const key = localStorage.getItem(KEY);
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401 && !retried) {
    const entered = window.prompt("This server needs an API key:");
    if (entered) {
      localStorage.setItem(KEY, entered);
      keyCookie(entered);
      return api(path, options, true);
    }
  }
  return response;
}

async function apiJSON(path, body) {
  const response = await api(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  let doc = null;
  try { doc = await response.json(); } catch (e) { doc = null; }
  if (!response.ok) {
    const message = doc && doc.error ? doc.error.message : response.status + " " + response.statusText;
    throw new Error(message);
  }
  return doc;
}

function setStatus(text, isError) {
  const el = document.getElementById("status");
  if (!el) return;
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function renderGrid(grid, hits) {
  grid.replaceChildren();
  for (const hit of hits) {
    const card = document.createElement("a");
    card.className = "card result";
    card.href = hit.page;
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = hit.name;
    img.loading = "lazy";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = hit.name + " (" + hit.width + "\u00d7" + hit.height + ")";
    card.append(img, score, name);
    grid.append(card);
  }
}

async function showInfo() {
  try {
    const h = await apiJSON("/health");
    const el = document.getElementById("info");
    if (el && h.collection) el.textContent = h.collection.images + " images \u00b7 " + h.model;
  } catch (e) { /* the page still works */ }
}

// --- the search page ----------------------------------------------------------------------------

async function search(body) {
  const grid = document.getElementById("results");
  setStatus("searching\u2026");
  try {
    const doc = await apiJSON("/v1/search", body);
    renderGrid(grid, doc.data);
    setStatus(doc.data.length + " results");
  } catch (e) {
    grid.replaceChildren();
    setStatus(e.message, true);
  }
}

function initSearch() {
  showInfo();
  const form = document.getElementById("search-form");
  const k = () => parseInt(document.getElementById("k").value, 10) || 24;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = document.getElementById("query").value.trim();
    if (!query) { setStatus("type something to search for", true); return; }
    history.replaceState(null, "", "?q=" + encodeURIComponent(query));
    search({ query, k: k() });
  });
  document.getElementById("upload").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    search({ image: await readAsDataURL(file), k: k() });
  });
  const q = new URLSearchParams(location.search).get("q");
  if (q) { document.getElementById("query").value = q; search({ query: q, k: k() }); }
}

// --- an image's page ----------------------------------------------------------------------------

async function streamChat(messages, onPiece) {
  const response = await api("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ messages, stream: true }) });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* keep the status */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const doc = JSON.parse(data);
      if (doc.error) throw new Error(doc.error.message);
      const piece = doc.choices.length ? doc.choices[0].delta.content : null;
      if (piece) onPiece(piece);
    }
  }
}

async function initImage() {
  showInfo();
  const id = parseInt(location.pathname.split("/").pop(), 10);
  let info;
  try {
    info = await apiJSON("/v1/images/" + id);
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  document.title = info.name + " \u2014 polymodal";
  document.getElementById("image").src = info.url;
  document.getElementById("name").textContent = info.name + " (" + info.width + "\u00d7" + info.height + ")";
  document.getElementById("dup-threshold").textContent = info.threshold;
  renderGrid(document.getElementById("duplicates"), info.near_duplicates);
  document.getElementById("dup-count").textContent = info.near_duplicates.length
    ? "" : "none at this threshold";
  const caption = document.getElementById("caption");
  const chat = document.getElementById("chat-form");
  if (!info.captions) {
    caption.textContent = "(no VLM loaded: start the server with --vlm PATH)";
    chat.querySelector("button").disabled = true;
    return;
  }
  apiJSON("/v1/caption", { id }).then((doc) => { caption.textContent = doc.caption; },
                                      (e) => { caption.textContent = e.message; caption.className = "error"; });
  const dataURL = await readAsDataURL(await (await api(info.url)).blob());
  const messages = [];
  const log = document.getElementById("chat-log");
  chat.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("question");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const user = document.createElement("div");
    user.className = "user";
    user.textContent = text;
    const answer = document.createElement("div");
    answer.className = "assistant";
    log.append(user, answer);
    const content = messages.length ? text
      : [{ type: "image_url", image_url: { url: dataURL } }, { type: "text", text }];
    messages.push({ role: "user", content });
    try {
      await streamChat(messages, (piece) => { answer.textContent += piece; log.scrollTop = log.scrollHeight; });
      messages.push({ role: "assistant", content: answer.textContent });
    } catch (e) {
      messages.pop();
      answer.textContent = e.message;
      answer.className = "assistant error";
    }
  });
  chat.dataset.ready = "1";  // the speak button may send now
}

// --- speech: an audio file or the microphone -> /v1/audio/transcriptions ---------------------------

async function transcribe(blob, filename) {
  const form = new FormData();
  form.append("file", blob, filename);
  form.append("model", "whisper-1");
  const response = await api("/v1/audio/transcriptions", { method: "POST", body: form });
  let doc = null;
  try { doc = await response.json(); } catch (e) { doc = null; }
  if (!response.ok) {
    throw new Error(doc && doc.error ? doc.error.message : response.status + " " + response.statusText);
  }
  return doc.text;
}

// 16-bit PCM mono WAV: what the server reads everywhere (Chromium's MediaRecorder gives only WebM,
// which libsndfile does not read, so the microphone is captured as samples through Web Audio)
function encodeWAV(chunks, rate) {
  const n = chunks.reduce((sum, c) => sum + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) view.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  let at = 44;
  for (const c of chunks) {
    for (let i = 0; i < c.length; i++, at += 2) {
      const v = Math.max(-1, Math.min(1, c[i]));
      view.setInt16(at, v < 0 ? v * 0x8000 : v * 0x7fff, true);
    }
  }
  return new Blob([view], { type: "audio/wav" });
}

class MicRecorder {
  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    this.context = new AudioContext();
    this.source = this.context.createMediaStreamSource(this.stream);
    this.node = this.context.createScriptProcessor(4096, 1, 1);
    this.chunks = [];
    this.node.onaudioprocess = (e) => this.chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
    this.source.connect(this.node);
    this.node.connect(this.context.destination);
  }
  async stop() {
    this.source.disconnect();
    this.node.disconnect();
    for (const track of this.stream.getTracks()) track.stop();
    const rate = this.context.sampleRate;
    await this.context.close();
    return encodeWAV(this.chunks, rate);
  }
}

// a record button: first click starts, the second stops and hands the WAV to onAudio
function recordButton(button, onAudio, onError) {
  let recorder = null;
  const label = button.textContent;
  button.addEventListener("click", async (event) => {
    event.preventDefault();
    if (!recorder) {
      recorder = new MicRecorder();
      try {
        await recorder.start();
        button.textContent = "\u25a0 stop";
        button.classList.add("recording");
      } catch (e) {
        recorder = null;
        onError("microphone: " + e.message);
      }
      return;
    }
    const r = recorder;
    recorder = null;
    button.textContent = label;
    button.classList.remove("recording");
    onAudio(await r.stop(), "recording.wav");
  });
}

async function speechAvailable() {
  try { return Boolean((await apiJSON("/health")).asr); } catch (e) { return false; }
}

// the search page's speech box: upload or record, the transcript is shown and becomes the query
async function initSpeech() {
  const box = document.getElementById("speech");
  if (!box || !(await speechAvailable())) return;
  box.hidden = false;
  const out = document.getElementById("transcript");
  const run = async (blob, name) => {
    out.textContent = "transcribing\u2026";
    out.className = "";
    try {
      const text = await transcribe(blob, name);
      out.textContent = text;
      document.getElementById("query").value = text;
    } catch (e) {
      out.textContent = e.message;
      out.className = "error";
    }
  };
  document.getElementById("audio-upload").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) run(file, file.name);
  });
  recordButton(document.getElementById("record"), run, (m) => { out.textContent = m; out.className = "error"; });
}

// the image page's "speak" button (and audio file): the transcript is sent as the chat message
async function initChatSpeech() {
  const speak = document.getElementById("speak");
  if (!speak || !(await speechAvailable())) return;
  const file = document.getElementById("chat-audio");
  speak.hidden = false;
  file.hidden = false;
  const send = async (blob, name) => {
    const input = document.getElementById("question");
    input.placeholder = "transcribing\u2026";
    try {
      const text = await transcribe(blob, name);
      const form = document.getElementById("chat-form");
      if (!form.dataset.ready) {  // no VLM (nobody to ask), or the page is still loading the image
        setStatus("heard: \u201c" + text + "\u201d (the chat is not ready: is a VLM loaded?)", true);
        return;
      }
      input.value = text;
      form.requestSubmit();
    } catch (e) {
      setStatus(e.message, true);
    } finally {
      input.placeholder = "Ask something about the image";
    }
  };
  recordButton(speak, send, (m) => setStatus(m, true));
  file.addEventListener("change", (event) => {
    const f = event.target.files[0];
    if (f) send(f, f.name);
    event.target.value = "";
  });
}
