// The server, through its public API only: /health, /props and the OpenAI endpoints.

const KEY = "gemma4.apiKey";

export class APIError extends Error {
  constructor(message, status, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const apiKey = () => localStorage.getItem(KEY) || "";
export const saveApiKey = (key) => localStorage.setItem(KEY, key);
export const forgetApiKey = () => localStorage.removeItem(KEY);

async function request(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new APIError(`The server at ${location.origin} is unreachable: is gemma4 serve running?`, 0, "unreachable");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let code = null;
    try {
      const body = await response.json();
      message = body.error?.message || message;
      code = body.error?.code || null;
    } catch {
      // not JSON: keep the status line
    }
    throw new APIError(message, response.status, code);
  }
  return response;
}

/** "ready" | "loading" | "unreachable" */
export async function health() {
  try {
    await request("/health");
    return "ready";
  } catch (error) {
    return error.status === 503 ? "loading" : "unreachable";
  }
}

export const models = async () => (await request("/v1/models")).json();
export const tokenize = async (body) => (await request("/tokenize", { method: "POST", body: JSON.stringify(body) })).json();
export const props = async () => (await request("/props")).json();

/** Stream a completion (chat, or text for a base model): yields the server's chunks (the last one carries usage and timings). */
export async function* stream(body, signal) {
  const payload = { ...body, stream: true, stream_options: { include_usage: true } };
  const path = body.messages ? "/v1/chat/completions" : "/v1/completions";
  const response = await request(path, { method: "POST", body: JSON.stringify(payload), signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(chunk.error.message, 500, chunk.error.code);
        yield chunk;
      }
    }
  }
}
