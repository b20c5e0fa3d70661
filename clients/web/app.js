// The persona chat: every message sends the whole conversation to POST /generate with the chosen adapter, or a
// weighted blend of two, and streams the reply (server-sent events over fetch). `history` is what the server
// sees; the page mirrors it.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  form: $("composer"), select: $("adapter-select"), input: $("message-input"), send: $("send-button"),
  conversation: $("conversation"), hint: $("empty-hint"), status: $("status"), model: $("model-info"),
  maxTokens: $("max-tokens"), temperature: $("temperature"), clear: $("clear-button"), refresh: $("refresh-button"),
  settings: $("settings"), apiKey: $("api-key"), stop: $("stop-button"), system: $("system-prompt"),
  blend: $("blend-select"), blendWeight: $("blend-weight"), blendValue: $("blend-value"),
};
// Kept for this tab only (sessionStorage): a reload keeps it, closing the tab forgets it.
const KEY_STORAGE = "loraplex-api-key";
const history = [];
let busy = false;
let writing = null; // the AbortController of the reply being written: Stop closes its stream, which ends the request

function option(value, text) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = text;
  return el;
}

function authHeaders() {
  const key = els.apiKey.value.trim();
  return key ? { authorization: `Bearer ${key}` } : {};
}

async function errorMessage(response) {
  if (response.status === 401) {
    els.settings.open = true;
    return els.apiKey.value.trim() ? "the server refused this API key (Settings)"
      : "this server wants an API key: enter it under Settings";
  }
  try {
    const body = await response.json();
    return `${body.error.message} (${body.error.code})`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function getJSON(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

async function loadAdapters() {
  const chosen = els.select.value;
  const blended = els.blend.value;
  try {
    const { adapters } = await getJSON("/adapters");
    const options = () => adapters.map((a) => option(a.name, `${a.name} (rank ${a.rank})`));
    els.select.replaceChildren(option("", "base model"), ...options());
    els.select.value = adapters.some((a) => a.name === chosen) ? chosen : "";
    els.blend.replaceChildren(option("", "nothing"), ...options());
    els.blend.value = adapters.some((a) => a.name === blended) ? blended : "";
    showBlend();
  } catch (err) {
    setStatus(`Could not load adapters: ${err.message}`);
  }
}

async function loadHealth() {
  try {
    const health = await getJSON("/health");
    els.model.textContent = `${health.model} on ${health.device} · ${health.adapters} adapters`;
  } catch (err) {
    els.model.textContent = "server unreachable";
  }
}

const percent = (weight) => `${Math.round(weight * 100)}%`;

function showBlend() {
  els.blendWeight.disabled = !els.blend.value;
  els.blendValue.textContent = percent(parseFloat(els.blendWeight.value));
  els.blendWeight.setAttribute("aria-valuetext", `${els.blendValue.textContent} of the second persona`);
}

// What a message is sent with: `adapter` alone (the base when null), or `adapters` with weights when a second
// persona is blended in at weight w > 0: the first at 1 - w (the base's share when there is no first).
function chosenAdapters() {
  const first = els.select.value || null;
  const second = els.blend.value || null;
  const w = parseFloat(els.blendWeight.value);
  if (!second || !(w > 0) || second === first) return { adapter: first };
  const rest = Math.round((1 - w) * 100) / 100;
  const adapters = first ? [{ name: first, weight: rest }, { name: second, weight: w }] : [{ name: second, weight: w }];
  return { adapters, label: `${first ?? "base"} ${percent(rest)} + ${second} ${percent(w)}` };
}

function setStatus(text) {
  els.status.textContent = text;
}

function setBusy(value) {
  busy = value;
  els.send.disabled = value;
  els.clear.disabled = value;
  els.send.textContent = value ? "Writing…" : "Send";
  els.stop.hidden = !value;
}

// A persona keeps one hue on every reply it writes, so switches are visible at a glance.
function hueOf(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.codePointAt(0)) % 360;
  return h;
}

function addMessage(kind, label, text) {
  const item = document.createElement("li");
  item.className = `message ${kind}`;
  item.dataset.testid = kind === "user" ? "user-message" : "reply";
  const tag = document.createElement("span");
  tag.className = kind === "user" ? "message-label" : "message-label reply-label";
  tag.textContent = label;
  const body = document.createElement("div");
  body.className = "message-text";
  body.textContent = text;
  item.append(tag, body);
  els.conversation.append(item);
  els.hint.hidden = true;
  item.scrollIntoView({ block: "end" });
  return item;
}

function addReply(adapter, label) {
  const persona = adapter ?? "base";
  const item = addMessage("reply", label ?? persona, "");
  item.dataset.adapter = persona;
  item.dataset.state = "streaming";
  item.setAttribute("aria-busy", "true");
  item.style.setProperty("--persona-hue", adapter ? hueOf(adapter) : 220);
  return item;
}

function finishReply(item, state, meta) {
  item.dataset.state = state;
  item.setAttribute("aria-busy", "false");
  const line = document.createElement("p");
  line.className = "reply-meta";
  line.textContent = meta;
  item.append(line);
}

// Events are `data: {json}` blocks separated by a blank line; the last one carries finish_reason and usage.
async function streamReply(body, onText, signal) {
  const response = await fetch("/generate", {
    method: "POST",
    signal,
    headers: { "content-type": "application/json", accept: "text/event-stream", ...authHeaders() },
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let text = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      const chunk = JSON.parse(data);
      if (chunk.text) {
        text += chunk.text;
        onText(chunk.text);
      }
      if (chunk.finish_reason) final = chunk;
    }
  }
  if (!final) throw new Error("the reply stream ended early");
  return { text, finishReason: final.finish_reason, usage: final.usage };
}

function generationParams() {
  const params = {};
  const maxTokens = parseInt(els.maxTokens.value, 10);
  const temperature = parseFloat(els.temperature.value);
  if (maxTokens > 0) params.max_new_tokens = maxTokens;
  if (temperature >= 0) params.temperature = temperature;
  return params;
}

async function send(event) {
  event.preventDefault();
  const text = els.input.value.trim();
  if (!text || busy) return;
  const { adapter, adapters, label } = chosenAdapters();
  history.push({ role: "user", content: text });
  const question = addMessage("user", "you", text);
  els.input.value = "";
  const heaviest = adapters?.reduce((a, b) => (b.weight > a.weight ? b : a)).name;
  const reply = addReply(adapter ?? heaviest ?? null, label);
  const replyText = reply.querySelector(".message-text");
  const system = els.system.value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  writing = new AbortController();
  setBusy(true);
  setStatus(`${label ?? adapter ?? "base model"} is writing…`);
  try {
    const chosen = adapters ? { adapters } : { adapter };
    const result = await streamReply({ messages, ...chosen, ...generationParams() },
      (piece) => { replyText.textContent += piece; }, writing.signal);
    history.push({ role: "assistant", content: result.text });
    const tokens = result.usage.completion_tokens;
    finishReply(reply, "done", `${tokens} token${tokens === 1 ? "" : "s"} · ${result.finishReason}`);
    setStatus("");
  } catch (err) {
    if (err.name === "AbortError") { // stopped: what was written so far stays, as the reply it is
      history.push({ role: "assistant", content: replyText.textContent });
      finishReply(reply, "done", "stopped");
      setStatus("Stopped.");
      return;
    }
    history.pop(); // the turn failed: the next message must not follow an unanswered one
    question.classList.add("unsent");
    finishReply(reply, "error", `Not sent: ${err.message}`);
    setStatus(`Error: ${err.message}`);
  } finally {
    writing = null;
    setBusy(false);
    els.input.focus();
  }
}

function clearConversation() {
  history.length = 0;
  els.conversation.replaceChildren();
  els.hint.hidden = false;
  setStatus("New conversation.");
  els.input.focus();
}

els.form.addEventListener("submit", send);
els.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    els.form.requestSubmit();
  }
});
els.clear.addEventListener("click", clearConversation);
els.stop.addEventListener("click", () => writing?.abort());
els.apiKey.addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, els.apiKey.value.trim());
  setStatus("");
  loadAdapters();
});
els.refresh.addEventListener("click", () => { loadAdapters(); loadHealth(); });
els.blend.addEventListener("change", showBlend);
els.blendWeight.addEventListener("input", showBlend);
document.addEventListener("visibilitychange", () => { if (!document.hidden) loadAdapters(); });
els.apiKey.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
loadAdapters();
loadHealth();
