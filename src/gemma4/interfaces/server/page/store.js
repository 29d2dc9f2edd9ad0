// Conversations, kept in the browser (localStorage): nothing leaves the machine but requests.

const CONVERSATIONS = "gemma4.conversations";
const CURRENT = "gemma4.current";
const ROLES = new Set(["system", "user", "assistant", "tool"]);

export const DEFAULT_SETTINGS = { system: "", temperature: 1, maxTokens: 1024, thinking: false };

const newId = () => `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;

export function newConversation() {
  return { id: newId(), title: "New chat", created: Date.now(), settings: { ...DEFAULT_SETTINGS }, messages: [] };
}

export function load() {
  let conversations = [];
  try {
    conversations = JSON.parse(localStorage.getItem(CONVERSATIONS) || "[]").map(checked);
  } catch {
    conversations = [];
  }
  if (!conversations.length) conversations = [newConversation()];
  const current = localStorage.getItem(CURRENT);
  return { conversations, current: conversations.some((c) => c.id === current) ? current : conversations[0].id };
}

export function save(conversations, current) {
  localStorage.setItem(CONVERSATIONS, JSON.stringify(conversations));
  localStorage.setItem(CURRENT, current);
}

/** A conversation from JSON someone gave us: only the fields we know, with the types we expect. */
export function checked(raw) {
  if (!raw || typeof raw !== "object" || !Array.isArray(raw.messages)) throw new Error("not a conversation: it needs a messages list");
  const text = (value) => (typeof value === "string" ? value : "");
  const messages = raw.messages.map((m, i) => {
    if (!m || !ROLES.has(m.role)) throw new Error(`message ${i + 1} has no known role (system, user, assistant, tool)`);
    const message = { role: m.role, content: typeof m.content === "string" ? m.content : Array.isArray(m.content) ? m.content.map(part).filter(Boolean) : "" };
    if (m.reasoning || m.reasoning_content) message.reasoning = text(m.reasoning || m.reasoning_content);
    if (Array.isArray(m.tool_calls)) {
      message.tool_calls = m.tool_calls.map((c) => ({
        id: text(c?.id), type: "function", function: { name: text(c?.function?.name), arguments: text(c?.function?.arguments) },
      }));
    }
    if (m.tool_call_id) message.tool_call_id = text(m.tool_call_id);
    if (m.stats && typeof m.stats === "object") message.stats = m.stats;
    if (m.error) message.error = text(m.error);
    return message;
  });
  const settings = { ...DEFAULT_SETTINGS, ...(raw.settings && typeof raw.settings === "object" ? raw.settings : {}) };
  return { id: text(raw.id) || newId(), title: text(raw.title) || "Imported chat", created: Number(raw.created) || Date.now(), settings, messages };
}

/** A content part we can show and send: text, or an attachment as the page makes them (data: URLs only). */
function part(raw) {
  const text = (value) => (typeof value === "string" ? value : "");
  if (raw?.type === "text") return { type: "text", text: text(raw.text) };
  const extra = { name: text(raw?.name), cost: text(raw?.cost) };
  if (raw?.type === "image_url" && /^data:image\//.test(raw.image_url?.url)) return { type: "image_url", image_url: { url: raw.image_url.url }, ...extra };
  if (raw?.type === "video_url" && /^data:video\//.test(raw.video_url?.url)) return { type: "video_url", video_url: { url: raw.video_url.url }, ...extra };
  if (raw?.type === "input_audio" && typeof raw.input_audio?.data === "string") {
    return { type: "input_audio", input_audio: { data: raw.input_audio.data, format: text(raw.input_audio.format) }, ...extra };
  }
  return null;
}

/** Imported JSON -> conversations (one, or a list), each with a fresh id so nothing is overwritten. */
export function parseImport(json) {
  const raw = JSON.parse(json);
  return (Array.isArray(raw) ? raw : [raw]).map((c) => ({ ...checked(c), id: newId() }));
}
