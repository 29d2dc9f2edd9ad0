// The chat page: conversations in the browser, answers streamed from gemma4 serve's OpenAI API.

import * as api from "./api.js";
import * as store from "./store.js";
import { bytes, element, renderMarkdown, statsLine } from "./render.js";

const $ = (id) => document.getElementById(id);
const saved = store.load();
const state = { conversations: saved.conversations, current: saved.current, model: null, chat: true, modalities: {}, running: null, attachments: [] };

const current = () => state.conversations.find((c) => c.id === state.current);
let persistTimer = null;
function persist(now = false) {
  clearTimeout(persistTimer);
  const save = () => {
    try {
      store.save(state.conversations, state.current);
    } catch (error) {  // the browser's storage is full (attachments are big): say so, keep going
      showBanner(`This browser cannot keep more (${error.name}): export and delete old conversations, or attach smaller files.`);
    }
  };
  if (now) save();
  else persistTimer = setTimeout(save, 300);
}

// --- status and errors -------------------------------------------------------------------
function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function showBanner(text) {
  $("banner").textContent = text;
  $("banner").hidden = !text;
}

async function connect() {
  for (;;) {
    const health = await api.health();
    if (health === "ready") break;
    setStatus(health === "loading" ? "loading the model…" : "server unreachable", health === "loading" ? "busy" : "error");
    showBanner(health === "loading" ? "" : `The server at ${location.origin} is unreachable: is gemma4 serve running? Retrying…`);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  showBanner("");
  try {
    state.model = (await api.models()).data[0];
    await refreshProps();
    setStatus("ready", "ok");
  } catch (error) {
    await failed(error);
  }
}

async function refreshProps() {
  const props = await api.props();
  state.modalities = props.modalities || {};
  state.chat = props.chat !== false;
  $("model-name").textContent = props.model;
  const facts = [`${props.context.toLocaleString()} tokens context`, `${props.parallel} at once`];
  if (!state.chat) facts.unshift("a base model: it continues your text");
  if (props.memory?.resident_bytes) facts.push(`${bytes(props.memory.resident_bytes)} in use`);
  $("model-facts").textContent = facts.join(" · ");
  const accepts = [state.modalities.vision && "image/*", state.modalities.vision && "video/*", state.modalities.audio && "audio/*"].filter(Boolean);
  $("attach").hidden = !accepts.length;  // absent, not broken, on a model without encoders
  $("attach-file").accept = accepts.join(",");
}

/** An error from the server, said plainly; a missing or wrong key opens the key dialog. */
async function failed(error) {
  if (error.status === 401) {
    setStatus("API key needed", "error");
    showBanner(`The server refused the request: ${error.message}`);
    await askForKey(api.apiKey() ? "The saved API key was refused. Enter the right one:" : "This server asks for an API key:");
    return;
  }
  setStatus(error.status === 0 ? "server unreachable" : "request refused", "error");
  showBanner(error.message);
}

function askForKey(reason) {
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  $("key-dialog").showModal();
  return new Promise((resolve) => {
    $("key-dialog").addEventListener("close", async () => {
      if ($("key-dialog").returnValue === "save" && $("key-input").value.trim()) {
        api.saveApiKey($("key-input").value.trim());
        showBanner("");
        await connect();
      }
      resolve();
    }, { once: true });
  });
}

// --- drawing ------------------------------------------------------------------------------
function drawList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of [...state.conversations].sort((a, b) => b.created - a.created)) {
    const button = element("button", { type: "button", class: "conversation" }, conversation.title);
    if (conversation.id === state.current) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => select(conversation.id));
    const item = element("li");
    item.append(button);
    list.append(item);
  }
}

function drawSettings() {
  const settings = current().settings;
  $("system").value = settings.system;
  $("temperature").value = settings.temperature;
  $("max-tokens").value = settings.maxTokens;
  $("thinking").checked = settings.thinking;
}

function drawMessages() {
  const list = $("messages");
  const messages = current().messages;
  list.replaceChildren(...messages.map((message, index) => messageItem(message, index)));
  if (!messages.length) list.append(element("li", { class: "welcome" }, "Ask anything. Conversations stay in this browser; answers come from the model on this server."));
  list.scrollTop = list.scrollHeight;
}

function redraw(index) {
  const old = $("messages").children[index];
  const item = messageItem(current().messages[index], index);
  if (old) old.replaceWith(item);
  else $("messages").append(item);
  const list = $("messages");
  if (list.scrollHeight - list.scrollTop - list.clientHeight < 200) list.scrollTop = list.scrollHeight;
}

function messageItem(message, index) {
  const item = element("li", { class: `message ${message.role}`, "data-index": String(index) });
  item.append(element("div", { class: "role" }, message.role === "assistant" ? (state.model?.id || "model") : message.role));
  if (message.role === "user") {
    const text = typeof message.content === "string" ? message.content : message.content.filter((p) => p.type === "text").map((p) => p.text).join("");
    item.append(element("div", { class: "text" }, text));
    for (const part of Array.isArray(message.content) ? message.content : []) {
      if (part.type === "image_url") item.append(element("img", { class: "thumbnail", src: part.image_url.url, alt: part.name || "image" }));
      else if (part.type !== "text") item.append(element("div", { class: "attachment" }, `${part.type === "input_audio" ? "audio" : "video"}: ${part.name || part.type}${part.cost ? ` · ${part.cost}` : ""}`));
    }
  } else {
    if (message.reasoning) {
      const details = element("details", { class: "reasoning" });
      details.append(element("summary", {}, state.running?.message === message && !message.content ? "Thinking…" : "Thinking"));
      details.append(element("div", { class: "text" }, message.reasoning));
      item.append(details);
    }
    const body = element("div", { class: "markdown" });
    renderMarkdown(body, typeof message.content === "string" ? message.content : "");
    item.append(body);
    for (const call of message.tool_calls || []) {
      item.append(element("div", { class: "tool-call", "aria-label": "Tool call" }, `${call.function.name}(${call.function.arguments})`));
    }
  }
  if (message.error) item.append(element("div", { class: "error", role: "alert" }, message.error));
  if (message.stopped) item.append(element("div", { class: "note" }, "stopped"));
  if (message.stats) item.append(element("div", { class: "stats" }, statsLine(message.stats)));
  const actions = element("div", { class: "actions" });
  if (message.role === "user" && !state.running) {
    const edit = element("button", { type: "button", "aria-label": "Edit and resend this message" }, "Edit");
    edit.addEventListener("click", () => startEdit(item, index));
    actions.append(edit);
  }
  if (message.role === "assistant" && index === current().messages.length - 1 && !state.running) {
    const again = element("button", { type: "button", "aria-label": "Regenerate this answer" }, "Regenerate");
    again.addEventListener("click", regenerate);
    actions.append(again);
  }
  if (actions.children.length) item.append(actions);
  return item;
}

function startEdit(item, index) {
  const message = current().messages[index];
  const box = element("textarea", { class: "edit", "aria-label": "Edited message", rows: "3" });
  box.value = typeof message.content === "string" ? message.content : "";
  const save = element("button", { type: "button", "aria-label": "Save and resend" }, "Save & send");
  const cancel = element("button", { type: "button", "aria-label": "Cancel the edit" }, "Cancel");
  save.addEventListener("click", () => {
    current().messages.splice(index);
    send(box.value);
  });
  cancel.addEventListener("click", drawMessages);
  item.replaceChildren(box, element("div", { class: "actions" }));
  item.lastChild.append(save, cancel);
  box.focus();
}

function select(id) {
  if (state.running) stop();
  state.current = id;
  persist(true);
  drawList();
  drawSettings();
  drawMessages();
  closeSidebarOnPhones();
}

// --- talking -------------------------------------------------------------------------------
function requestBody(conversation) {
  const { system, temperature, maxTokens, thinking } = conversation.settings;
  if (!state.chat) {  // no chat template: the model continues the last message's text
    const last = conversation.messages.findLast((m) => m.role === "user");
    return { model: state.model?.id, prompt: typeof last.content === "string" ? last.content : "", temperature: Number(temperature), max_tokens: Number(maxTokens) };
  }
  const messages = system.trim() ? [{ role: "system", content: system }] : [];
  for (const m of conversation.messages) {
    if (m.role === "assistant" && (m.error || (!m.content && !m.tool_calls))) continue;
    const out = { role: m.role, content: m.content };
    if (m.tool_calls) out.tool_calls = m.tool_calls;
    if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
    messages.push(out);
  }
  return { model: state.model?.id, messages, temperature: Number(temperature), max_tokens: Number(maxTokens), reasoning_effort: thinking ? "medium" : "none" };
}

async function send(text) {
  const conversation = current();
  const parts = state.attachments.length ? [{ type: "text", text }, ...state.attachments] : text;
  if (!text.trim() && !state.attachments.length) return;
  conversation.messages.push({ role: "user", content: parts });
  if (conversation.title === "New chat") conversation.title = text.trim().slice(0, 40) || "Attachment";
  state.attachments = [];
  drawAttachments();
  await answer(conversation);
}

async function regenerate() {
  const conversation = current();
  if (conversation.messages.at(-1)?.role === "assistant") conversation.messages.pop();
  await answer(conversation);
}

async function answer(conversation) {
  const message = { role: "assistant", content: "" };
  const body = requestBody(conversation);
  conversation.messages.push(message);
  const index = conversation.messages.length - 1;
  const controller = new AbortController();
  state.running = { controller, message };
  busy(true);
  drawList();
  drawMessages();
  let frame = 0;
  const update = () => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => state.current === conversation.id && redraw(index));
    persist();
  };
  try {
    for await (const chunk of api.stream(body, controller.signal)) {
      const choice = chunk.choices?.[0];
      const delta = choice?.delta || (choice?.text ? { content: choice.text } : {});
      if (delta.content) message.content += delta.content;
      if (delta.reasoning_content) message.reasoning = (message.reasoning || "") + delta.reasoning_content;
      for (const call of delta.tool_calls || []) {
        message.tool_calls ||= [];
        if (call.id) message.tool_calls[call.index] = { id: call.id, type: "function", function: { name: call.function.name, arguments: "" } };
        else message.tool_calls[call.index].function.arguments += call.function.arguments || "";
      }
      if (chunk.usage) {
        const t = chunk.timings || {};
        message.stats = { tokensPerSecond: t.decode_tokens_per_second, firstTokenMs: t.first_token_ms, promptTokens: chunk.usage.prompt_tokens,
                          cachedTokens: chunk.usage.prompt_tokens_details?.cached_tokens, completionTokens: chunk.usage.completion_tokens };
      }
      update();
    }
    setStatus("ready", "ok");
  } catch (error) {
    if (error.name === "AbortError") message.stopped = true;
    else {
      message.error = error.message;
      await failed(error);
    }
  } finally {
    cancelAnimationFrame(frame);
    state.running = null;
    busy(false);
    persist(true);
    if (state.current === conversation.id) drawMessages();
    refreshProps().catch(() => {});
  }
}

function stop() {
  state.running?.controller.abort();
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  if (on) setStatus("answering…", "busy");
}

// --- attachments (only where the model has the encoders) -----------------------------------
function drawAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  state.attachments.forEach((part, i) => {
    const chip = element("span", { class: "chip" }, `${part.name} · ${part.cost}`);
    const remove = element("button", { type: "button", "aria-label": `Remove ${part.name}` }, "×");
    remove.addEventListener("click", () => {
      state.attachments.splice(i, 1);
      drawAttachments();
    });
    chip.append(remove);
    list.append(chip);
  });
}

const KINDS = { image: "vision", video: "vision", audio: "audio" };

async function attach(files) {
  for (const file of files) {
    const kind = file.type.split("/")[0];
    if (!state.modalities[KINDS[kind]]) {
      const reads = [state.modalities.vision && "images and video", state.modalities.audio && "audio"].filter(Boolean).join(" and ");
      showBanner(`${file.name}: this model reads ${reads || "text only"}`);
      continue;
    }
    const url = await new Promise((resolve) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.readAsDataURL(file);
    });
    const part = kind === "image" ? { type: "image_url", image_url: { url } }
      : kind === "video" ? { type: "video_url", video_url: { url } }
      : { type: "input_audio", input_audio: { data: url.split(",")[1], format: file.name.split(".").pop() } };
    part.name = file.name;
    try {  // what it costs, as the server counts it
      const counted = await api.tokenize({ messages: [{ role: "user", content: [part] }] });
      part.cost = counted.media[0]?.description;
    } catch (error) {
      showBanner(`${file.name}: ${error.message}`);
      continue;
    }
    state.attachments.push(part);
  }
  drawAttachments();
}

// --- conversations -------------------------------------------------------------------------
function download(conversation) {
  const blob = new Blob([JSON.stringify(conversation, null, 2)], { type: "application/json" });
  const link = element("a", { href: URL.createObjectURL(blob), download: `${conversation.title.replace(/[^\w-]+/g, "_") || "chat"}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function closeSidebarOnPhones() {
  document.body.classList.remove("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.running) return;
    const text = $("input").value;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.running) stop();
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    const conversation = store.newConversation();
    state.conversations.push(conversation);
    select(conversation.id);
    $("input").focus();
  });
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", async () => {
    try {
      const imported = store.parseImport(await $("import-file").files[0].text());
      state.conversations.push(...imported);
      select(imported[0].id);
      showBanner("");
    } catch (error) {
      showBanner(`Could not import that file: ${error.message}`);
    }
    $("import-file").value = "";
  });
  $("export").addEventListener("click", () => download(current()));
  $("rename").addEventListener("click", () => {
    const title = prompt("Rename this conversation", current().title);
    if (title?.trim()) {
      current().title = title.trim();
      persist(true);
      drawList();
    }
  });
  $("delete").addEventListener("click", () => {
    if (!confirm(`Delete "${current().title}"?`)) return;
    state.conversations = state.conversations.filter((c) => c.id !== state.current);
    if (!state.conversations.length) state.conversations.push(store.newConversation());
    select(state.conversations[0].id);
  });
  $("forget-key").addEventListener("click", () => {
    api.forgetApiKey();
    setStatus("API key forgotten");
  });
  for (const [id, key, read] of [["system", "system", (v) => v], ["temperature", "temperature", Number], ["max-tokens", "maxTokens", Number]]) {
    $(id).addEventListener("change", () => {
      current().settings[key] = read($(id).value);
      persist(true);
    });
  }
  $("thinking").addEventListener("change", () => {
    current().settings.thinking = $("thinking").checked;
    persist(true);
  });
  for (const [button, panel, open] of [["toggle-settings", "settings", null], ["toggle-sidebar", "sidebar", "sidebar-open"]]) {
    $(button).addEventListener("click", () => {
      const expanded = $(button).getAttribute("aria-expanded") !== "true";
      $(button).setAttribute("aria-expanded", String(expanded));
      if (open) document.body.classList.toggle(open, expanded);
      else $(panel).hidden = !expanded;
    });
  }
  $("attach").addEventListener("click", () => $("attach-file").click());
  $("attach-file").addEventListener("change", () => attach([...$("attach-file").files]).then(() => ($("attach-file").value = "")));
  document.addEventListener("dragover", (event) => !$("attach").hidden && event.preventDefault());
  document.addEventListener("drop", (event) => {
    if ($("attach").hidden) return;
    event.preventDefault();
    attach([...event.dataTransfer.files]);
  });
}

wire();
drawList();
drawSettings();
drawMessages();
connect();
