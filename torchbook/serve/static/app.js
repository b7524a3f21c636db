// torchbook chat: the page of `torchbook serve` (plain JavaScript, no build step, nothing fetched from elsewhere).
//
// Replies stream by server-sent events: from /v1/chat/completions for a plain model, from /api/chat for the
// chatbot system (the same chunks, plus a `torchbook` field with its tool calls, tool results and sources).
// Everything a model, a tool or an uploaded file wrote is put on the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  config: null,        // GET /api/web/config
  conversation: null,  // the chatbot system's conversation id (null: a new one on the first message)
  history: [],         // the messages of a plain model's conversation (kept by the page)
  controller: null,    // the running reply's AbortController
};

// An element with text (never HTML) and attributes.
function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  if (text !== null) node.textContent = text;
  return node;
}

function headers(extra = {}) {
  const key = $("api-key").value.trim() || localStorage.getItem("torchbook.key") || "";
  const out = { ...extra };
  if (key) out.Authorization = "Bearer " + key;
  return out;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error(body?.error?.message || `${response.status} ${response.statusText}`);
  return body;
}

function status(text) { $("status").textContent = text; }

function isChat() { return state.config && $("model").value === state.config.chat_model; }

// -- the configuration and the model list ------------------------------------------------------------------
async function loadConfig() {
  try {
    state.config = await api("/api/web/config");
  } catch (e) {
    status("cannot read the server's configuration: " + e.message);
    return;
  }
  const select = $("model");
  select.replaceChildren();
  const { chat_model: chat, models } = state.config;
  if (chat) select.append(el("option", { value: chat }, `${chat} (tools, knowledge, conversations)`));
  for (const id of models) select.append(el("option", { value: id }, id));
  if (state.config.mode) $("mode").value = state.config.mode;
  const saved = localStorage.getItem("torchbook.model");
  if (saved && [...select.options].some((o) => o.value === saved)) select.value = saved;
  if (state.config.keys_required && !$("api-key").value && !localStorage.getItem("torchbook.key")) {
    $("settings").open = true;
    status("this server asks for an API key: enter it in Settings");
  }
  modelChanged();
}

function modelChanged() {
  localStorage.setItem("torchbook.model", $("model").value);
  const chat = isChat();
  $("conversations-panel").classList.toggle("off", !chat);
  $("new").disabled = false;
  $("conversations-note").hidden = chat;
  $("conversations-note").textContent = chat ? "" :
    "A plain model's conversation stays in this page; choose the chatbot model to keep conversations.";
  $("documents-panel").hidden = !state.config?.knowledge;
  $("mode-label").hidden = !chat;
  newConversation();
  if (chat) loadConversations();
  else $("conversations").replaceChildren();
}

// -- conversations (the chatbot system's) ------------------------------------------------------------------
async function loadConversations() {
  const list = $("conversations");
  let rows;
  try {
    rows = (await api("/api/conversations")).data;
  } catch (e) {
    status("conversations: " + e.message);
    return;
  }
  list.replaceChildren();
  for (const row of rows) {
    const item = el("li", { "data-id": row.id });
    if (row.id === state.conversation) item.classList.add("current");
    const open = el("button", { class: "open", type: "button", title: row.title || row.id },
                    row.title || "(untitled)");
    open.addEventListener("click", () => resume(row.id));
    const del = el("button", { class: "delete", type: "button", title: "Delete", "aria-label": "Delete" }, "\u2715");
    del.addEventListener("click", () => removeConversation(row.id));
    item.append(open, del);
    list.append(item);
  }
}

function newConversation() {
  if (state.controller) return;
  state.conversation = null;
  state.history = [];
  $("messages").replaceChildren();
  document.querySelectorAll("#conversations li.current").forEach((li) => li.classList.remove("current"));
  closeSide();
  $("input").focus();
}

async function resume(id) {
  if (state.controller) return;
  let body;
  try {
    body = await api(`/api/conversations/${encodeURIComponent(id)}`);
  } catch (e) {
    status("resume: " + e.message);
    return;
  }
  state.conversation = id;
  $("messages").replaceChildren();
  let bubble = null;
  for (const m of body.messages) {
    if (m.role === "user") { addMessage("user", m.content || ""); bubble = null; }
    else if (m.role === "assistant") {
      bubble = bubble || addMessage("assistant", "");
      for (const call of m.tool_calls || []) toolCall(bubble, call.function?.name || "tool", call.function?.arguments);
      if (m.content) bubble.text.textContent += m.content;
    } else if (m.role === "tool") {
      bubble = bubble || addMessage("assistant", "");
      toolResult(bubble, m.name || "tool", { text: m.content || "" });
    }
  }
  document.querySelectorAll("#conversations li").forEach((li) => li.classList.toggle("current", li.dataset.id === id));
  closeSide();
  status(`resumed a conversation of ${body.messages.length} messages`);
}

async function removeConversation(id) {
  try {
    await api(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (e) {
    status("delete: " + e.message);
    return;
  }
  if (state.conversation === id) newConversation();
  loadConversations();
}

// -- messages ----------------------------------------------------------------------------------------------
function addMessage(role, text) {
  const node = el("div", { class: `message ${role}` });
  const label = el("div", { class: "role" }, role === "user" ? "You" : $("model").value);
  const events = el("div", { class: "events" });
  const body = el("div", { class: "text" }, text);
  const meta = el("div", { class: "meta" });
  node.append(label, events, body, meta);
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return { node, events, text: body, meta, tools: [] };
}

function toolCall(bubble, name, args) {
  const box = el("details", { class: "tool" });
  box.append(el("summary", {}, `Tool: ${name}`));
  box.append(el("div", { class: "label" }, "arguments"));
  box.append(el("pre", { class: "arguments" }, typeof args === "string" ? args : JSON.stringify(args ?? {}, null, 1)));
  bubble.events.append(box);
  bubble.tools.push({ name, box, done: false });
  return box;
}

function toolResult(bubble, name, output) {
  let entry = bubble.tools.find((t) => t.name === name && !t.done);
  if (!entry) entry = { name, box: toolCall(bubble, name, ""), done: false };
  entry.done = true;
  const text = output?.text ?? "";
  if (output?.error) entry.box.classList.add("failed");
  entry.box.querySelector("summary").textContent = `Tool: ${name} \u2192 ${text.split("\n")[0].slice(0, 80)}`;
  entry.box.append(el("div", { class: "label" }, output?.error ? "error" : "result"));
  entry.box.append(el("pre", { class: "result" }, text));
}

function showSources(bubble, sources) {
  if (!sources || !sources.length) return;
  const box = el("details", { class: "sources" });
  box.append(el("summary", {}, `Sources (${sources.length})`));
  const list = el("ol");
  for (const s of sources) {
    const full = typeof s === "string" ? s : JSON.stringify(s);
    list.append(el("li", { title: full }, full.split("/").pop()));  // a file's name and line; the path on hover
  }
  box.append(list);
  bubble.node.insertBefore(box, bubble.meta);
}

// One chunk of the stream: text, the chatbot system's events, the end.
function onChunk(bubble, chunk, turn) {
  if (chunk.error) throw new Error(chunk.error.message || "the server failed");
  const event = chunk.torchbook;
  if (event) {
    if (event.kind === "conversation") {
      state.conversation = event.id;
    } else if (event.kind === "tool_call") toolCall(bubble, event.name, event.arguments);
    else if (event.kind === "tool_result") toolResult(bubble, event.name, event.output);
    else if (event.kind === "sources") { turn.sources = event.sources; }
    else if (event.kind === "error" && event.name) toolResult(bubble, event.name, { ...event.output, error: true });
    else if (event.kind === "error") bubble.events.append(el("div", { class: "note error" }, event.text));
    else if (event.kind === "context") bubble.events.append(el("div", { class: "note" }, event.text));
  }
  for (const choice of chunk.choices || []) {
    const piece = choice.delta?.content;
    if (piece) {
      if (!turn.first) turn.first = performance.now();
      turn.text += piece;
      bubble.text.textContent += piece;  // text, never HTML
    }
    if (choice.finish_reason) turn.finish = choice.finish_reason;
  }
  if (chunk.usage) turn.usage = chunk.usage;
}

async function readStream(response, bubble, turn) {
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
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onChunk(bubble, JSON.parse(data), turn);
        bubble.node.scrollIntoView({ block: "end" });
      }
    }
  }
}

function settings() {
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  return { temperature: Number.isFinite(temperature) ? temperature : 0.7,
           max_tokens: Number.isFinite(maxTokens) && maxTokens > 0 ? maxTokens : 256 };
}

async function send(text) {
  if (state.controller || !text.trim()) return;
  const chat = isChat();
  const isNew = state.conversation === null;
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.node.classList.add("streaming");
  const turn = { text: "", sources: [], finish: null, usage: null, first: null, started: performance.now() };
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  const system = $("system").value.trim();
  let url, body;
  if (chat) {
    url = "/api/chat";
    body = { conversation_id: state.conversation, message: text, mode: $("mode").value, ...settings() };
    if (system) body.system = system;
  } else {
    state.history.push({ role: "user", content: text });
    url = "/v1/chat/completions";
    const messages = system ? [{ role: "system", content: system }, ...state.history] : state.history;
    body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true }, ...settings() };
  }
  try {
    const response = await fetch(url, { method: "POST", signal: controller.signal,
                                        headers: headers({ "Content-Type": "application/json" }),
                                        body: JSON.stringify(body) });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new Error(error?.error?.message || `${response.status} ${response.statusText}`);
    }
    await readStream(response, bubble, turn);
    showSources(bubble, turn.sources);
    const seconds = (performance.now() - turn.started) / 1000;
    const tokens = turn.usage?.completion_tokens;
    bubble.meta.textContent = [`finish: ${turn.finish || "stop"}`, tokens != null ? `${tokens} tokens` : null,
      `${seconds.toFixed(1)} s`].filter(Boolean).join(" \u00b7 ");
    if (!chat) state.history.push({ role: "assistant", content: turn.text });
  } catch (e) {
    if (e.name === "AbortError") {
      if (chat && isNew) state.conversation = null;  // the server keeps no stopped turn, nor the chat it began
      bubble.node.classList.add("stopped");
      bubble.meta.textContent = "stopped";
      showSources(bubble, turn.sources);
      if (!chat) state.history.push({ role: "assistant", content: turn.text });
    } else {
      bubble.node.classList.add("failed");
      bubble.meta.textContent = "error: " + e.message;
      if (!chat) state.history.pop();
    }
  } finally {
    bubble.node.classList.remove("streaming");
    state.controller = null;
    busy(false);
    if (chat) loadConversations();
  }
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("model").disabled = on;
  $("new").disabled = on;
}

function stop() {
  if (state.controller) state.controller.abort();  // closing the stream cancels the generation on the server
}

// -- documents ---------------------------------------------------------------------------------------------
async function loadDocuments() {
  if (!state.config?.knowledge) return;
  let rows;
  try {
    rows = (await api("/api/documents")).data;
  } catch (e) {
    $("upload-status").textContent = "documents: " + e.message;
    return;
  }
  const list = $("documents");
  list.replaceChildren();
  for (const row of rows) list.append(el("li", {}, row.chunks != null ? `${row.name} (${row.chunks} chunks)` : row.name));
}

function upload(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) { $("upload-status").textContent = "choose a file first"; return; }
  const progress = $("upload-progress");
  const note = $("upload-status");
  progress.hidden = false;
  progress.value = 0;
  $("upload-button").disabled = true;
  note.textContent = `sending ${file.name}\u2026`;
  const request = new XMLHttpRequest();
  request.open("POST", "/api/documents?name=" + encodeURIComponent(file.name));
  for (const [key, value] of Object.entries(headers({ "Content-Type": "application/octet-stream" }))) {
    request.setRequestHeader(key, value);
  }
  request.upload.onprogress = (e) => {
    if (e.lengthComputable) {
      progress.value = Math.round((90 * e.loaded) / e.total);
      note.textContent = `sending ${file.name}: ${Math.round((100 * e.loaded) / e.total)}%`;
    }
  };
  request.upload.onload = () => { progress.value = 90; note.textContent = `indexing ${file.name}\u2026`; };
  request.onload = () => {
    $("upload-button").disabled = false;
    let body = null;
    try { body = JSON.parse(request.responseText); } catch (e) { /* not JSON */ }
    if (request.status >= 200 && request.status < 300) {
      progress.value = 100;
      note.textContent = `added ${body.name}: ${body.chunks} chunks`;
      $("file").value = "";
      loadDocuments();
    } else {
      progress.hidden = true;
      note.textContent = "upload failed: " + (body?.error?.message || request.status);
    }
  };
  request.onerror = () => {
    $("upload-button").disabled = false;
    progress.hidden = true;
    note.textContent = "upload failed: the connection closed";
  };
  request.send(file);
}

// -- the side panel on a phone -----------------------------------------------------------------------------
function closeSide() {
  document.body.classList.remove("side-open");
  $("menu").setAttribute("aria-expanded", "false");
}

function toggleSide() {
  const open = document.body.classList.toggle("side-open");
  $("menu").setAttribute("aria-expanded", String(open));
}

// -- wiring ------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new").addEventListener("click", newConversation);
  $("model").addEventListener("change", modelChanged);
  $("upload").addEventListener("submit", upload);
  $("menu").addEventListener("click", toggleSide);
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("torchbook.key", $("api-key").value.trim());
    loadConfig().then(loadDocuments);
  });
  loadConfig().then(loadDocuments);
});
