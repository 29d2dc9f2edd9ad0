// Model output is untrusted text: Markdown is rendered, then sanitised, before it touches the page;
// everything else goes in as text, never as HTML.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";

const escape = (text) => text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
// HTML the model writes is shown as text, not interpreted (and the sanitiser below is a second wall).
const markdown = new Marked({ gfm: true, renderer: { html: (token) => escape(token.text) } });
hljs.configure({ ignoreUnescapedHTML: true });
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});
const FORBIDDEN = { FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed"], FORBID_ATTR: ["style"] };

/** Markdown -> sanitised HTML in `element`, code highlighted, each block with a copy button. */
export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(markdown.parse(text), FORBIDDEN);
  for (const code of element.querySelectorAll("pre > code")) {
    const language = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9);
    if (language && hljs.getLanguage(language)) hljs.highlightElement(code);
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy this code");
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(code.textContent);
        copy.textContent = "Copied";
      } catch {
        copy.textContent = "Copy failed";
      }
      setTimeout(() => (copy.textContent = "Copy"), 1500);
    });
    code.parentElement.prepend(copy);
  }
}

export function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

/** "12.3 tok/s · first token 0.41 s · 120 of 134 prompt tokens cached" */
export function statsLine(stats) {
  const parts = [];
  if (stats.tokensPerSecond != null) parts.push(`${stats.tokensPerSecond.toFixed(1)} tok/s`);
  if (stats.firstTokenMs != null) parts.push(`first token ${(stats.firstTokenMs / 1000).toFixed(2)} s`);
  if (stats.promptTokens != null) parts.push(`${stats.cachedTokens ?? 0} of ${stats.promptTokens} prompt tokens cached`);
  if (stats.completionTokens != null) parts.push(`${stats.completionTokens} tokens`);
  return parts.join(" · ");
}

export function bytes(n) {
  return n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : `${(n / 1e6).toFixed(0)} MB`;
}
