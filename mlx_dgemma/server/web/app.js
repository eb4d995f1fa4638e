// The chat page of mlx_dgemma.server. It streams POST /v1/chat/completions from this same origin and shows the
// canvas being denoised (the include_previews chunks) dimmed after the committed text. Untrusted text, the
// model's and the user's, reaches the page only as text nodes (textContent, append(string)), never as HTML.

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const STORAGE_KEY = "mlx_dgemma.chat.settings";
const FIELDS = ["system", "max-tokens", "temperature", "fast", "seed", "steps", "previews"];

let conversation = []; // the messages of this chat, sent with each request: {role, content}
let running = null; // the AbortController of the request in flight

// ---- settings ---------------------------------------------------------------------------------------------

function optionalNumber(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function readSettings() {
  return {
    system: $("system").value.trim(),
    maxTokens: optionalNumber("max-tokens"),
    temperature: optionalNumber("temperature"),
    fast: $("fast").value,
    seed: optionalNumber("seed"),
    steps: optionalNumber("steps"),
    previews: $("previews").checked,
  };
}

// Fields left empty are not sent: the server's defaults (its --max-tokens, --temp, --fast) apply.
function requestBody(messages, s) {
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true, include_previews: s.previews },
  };
  if (s.maxTokens !== undefined) body.max_tokens = s.maxTokens;
  if (s.temperature !== undefined) body.temperature = s.temperature;
  if (s.seed !== undefined) body.seed = s.seed;
  if (s.steps !== undefined) body.max_denoising_steps = s.steps;
  if (s.fast !== "default") body.fast = s.fast === "on";
  return body;
}

function saveSettings() {
  const saved = {};
  for (const id of FIELDS) saved[id] = $(id).type === "checkbox" ? $(id).checked : $(id).value;
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(saved));
  } catch {
    // storage may be disabled (private windows): settings then last as long as the page
  }
}

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}") || {};
  } catch {
    return;
  }
  for (const id of FIELDS) {
    if (!(id in saved)) continue;
    if ($(id).type === "checkbox") $(id).checked = Boolean(saved[id]);
    else $(id).value = String(saved[id]);
  }
}

// ---- rendering (text nodes only) ----------------------------------------------------------------------------

// Markdown-lite: ``` fenced blocks become <pre>, `code` and **bold** become <code> and <strong>; newlines are kept
// by the stylesheet (white-space: pre-wrap). Each piece is set as text: nothing is ever parsed as HTML.
function renderText(element, text) {
  element.replaceChildren();
  text.split("```").forEach((part, i) => {
    if (i % 2 === 0) {
      appendInline(element, part);
      return;
    }
    const newline = part.indexOf("\n");
    const hasLanguage = newline >= 0 && /^[\w+#.-]*$/.test(part.slice(0, newline));
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.textContent = (hasLanguage ? part.slice(newline + 1) : part).replace(/\n$/, "");
    pre.append(code);
    element.append(pre);
  });
}

function appendInline(element, text) {
  const pattern = /`([^`\n]+)`|\*\*([^*\n]+)\*\*/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    element.append(text.slice(last, match.index));
    const node = document.createElement(match[1] !== undefined ? "code" : "strong");
    node.textContent = match[1] ?? match[2];
    element.append(node);
    last = match.index + match[0].length;
  }
  element.append(text.slice(last));
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function nearBottom() {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function scrollDown(force = false) {
  if (force || nearBottom()) log.scrollTop = log.scrollHeight;
}

function addBubble(role, text = "") {
  $("empty").hidden = true;
  const bubble = element("article", `msg ${role}`);
  bubble.append(element("div", "role", role === "user" ? "You" : "Assistant"));
  const body = element("div", "body");
  const content = element("div", "content");
  renderText(content, text);
  body.append(content);
  bubble.append(body);
  log.append(bubble);
  scrollDown(true);
  return bubble;
}

function plural(n, word, many = `${word}s`) {
  return `${n} ${n === 1 ? word : many}`;
}

// ---- one streamed answer ----------------------------------------------------------------------------------

class ServerError extends Error {}

// The assistant's bubble while its answer streams: committed text, the dimmed canvas preview, then the stats.
class AssistantTurn {
  constructor(bubble) {
    this.bubble = bubble;
    this.body = bubble.querySelector(".body");
    this.content = bubble.querySelector(".content");
    this.reasoning = null; // a <details> with the model's thinking, made when some arrives
    this.preview = element("span", "preview");
    this.preview.setAttribute("aria-hidden", "true"); // redrawn every step: screen readers get the committed text
    this.body.append(this.preview);
    this.status = element("div", "status", "waiting for the model…");
    bubble.append(this.status);
    this.text = "";
    this.thought = "";
    this.previews = 0;
    this.finishReason = null;
    this.diffusion = null;
    this.usage = null;
    this.notice = null;
    this.started = performance.now();
    this.setState("streaming");
  }

  setState(state) {
    this.bubble.dataset.state = state;
    this.bubble.dataset.previews = String(this.previews);
  }

  // One parsed SSE chunk.
  on(chunk) {
    if (chunk.error && !chunk.choices) throw new ServerError(errorMessage(chunk));
    if (chunk.error) this.notice = errorMessage(chunk); // the answer was cut short (the request timeout)
    if (chunk.preview) this.showPreview(chunk.preview);
    const choice = chunk.choices && chunk.choices[0];
    if (choice) {
      const delta = choice.delta || {};
      if (delta.reasoning_content) this.addThought(delta.reasoning_content);
      if (delta.content) this.commit(delta.content);
      if (choice.finish_reason) {
        this.finishReason = choice.finish_reason;
        this.clearPreview();
      }
    }
    if (chunk.diffusion) this.diffusion = chunk.diffusion;
    if (chunk.usage) this.usage = chunk.usage;
  }

  showPreview(preview) {
    this.previews += 1;
    this.bubble.dataset.previews = String(this.previews);
    this.preview.textContent = preview.text;
    // step counts the schedule down (N..1); a canvas may commit before it runs out
    const left = plural(preview.step, "step");
    this.status.textContent = `denoising canvas ${preview.canvas + 1}, at most ${left} left`;
    scrollDown();
  }

  clearPreview() {
    this.preview.textContent = "";
  }

  commit(text) {
    const follow = nearBottom();
    this.text += text;
    renderText(this.content, this.text);
    this.clearPreview(); // the canvas committed: its preview is now text
    scrollDown(follow);
  }

  addThought(text) {
    if (!this.reasoning) {
      this.reasoning = element("details", "thinking");
      this.reasoning.append(element("summary", "", "Thinking"), element("div", "thought"));
      this.body.before(this.reasoning);
    }
    this.thought += text;
    this.reasoning.querySelector(".thought").textContent = this.thought;
  }

  end(state, message) {
    this.clearPreview();
    this.status.replaceChildren();
    this.status.className = "stats";
    const seconds = (performance.now() - this.started) / 1000;
    for (const part of statsParts(this.diffusion, this.usage, seconds, this.finishReason, state)) {
      this.status.append(element("span", "chip", part));
    }
    const problem = message || this.notice;
    if (problem) this.bubble.append(element("div", "error", problem));
    this.setState(state);
  }
}

function statsParts(diffusion, usage, seconds, finishReason, state) {
  const parts = [];
  if (diffusion) {
    parts.push(plural(diffusion.canvases, "canvas", "canvases"));
    parts.push(plural(diffusion.decoder_passes, "decoder pass", "decoder passes"));
    parts.push(`${Number(diffusion.tokens_per_forward).toFixed(2)} tokens/forward`);
  }
  if (usage) {
    const cached = usage.prompt_tokens_details?.cached_tokens;
    parts.push(`${usage.prompt_tokens} prompt tokens${cached ? ` (${cached} cached)` : ""}`);
    parts.push(`${usage.completion_tokens} completion tokens`);
  }
  parts.push(`${seconds.toFixed(1)} s`);
  if (state === "stopped") parts.push("stopped");
  else if (finishReason === "length") parts.push("max tokens reached");
  return parts;
}

function errorMessage(body) {
  const error = body && body.error;
  if (error && typeof error === "object" && error.message) return String(error.message);
  return typeof error === "string" ? error : "the server sent an error";
}

async function httpError(response) {
  let detail = "";
  try {
    detail = errorMessage(await response.json());
  } catch {
    detail = response.statusText;
  }
  return `HTTP ${response.status}: ${detail}`;
}

// The data of each server-sent event ("data: ..." lines; the server separates events by a blank line).
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

async function stream(turn, body, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new ServerError(await httpError(response));
  for await (const data of sseData(response)) {
    if (data === "[DONE]") return;
    turn.on(JSON.parse(data));
  }
  throw new ServerError("the connection closed before the answer was complete");
}

async function send(text) {
  const settings = readSettings();
  const messages = conversation; // "New chat" during the answer starts a new list; this one stays whole
  messages.push({ role: "user", content: text });
  addBubble("user", text);
  const turn = new AssistantTurn(addBubble("assistant"));
  const system = settings.system ? [{ role: "system", content: settings.system }] : [];
  const controller = new AbortController();
  setRunning(controller);
  try {
    await stream(turn, requestBody([...system, ...messages], settings), controller.signal);
    turn.end("done");
  } catch (e) {
    if (e.name === "AbortError") turn.end("stopped");
    else turn.end("error", e instanceof ServerError ? e.message : `cannot reach the server: ${e.message}`);
  } finally {
    setRunning(null);
  }
  // Chat templates want user and assistant turns to alternate: a turn without an answer is dropped.
  if (turn.text) messages.push({ role: "assistant", content: turn.text });
  else messages.pop();
}

// ---- controls -----------------------------------------------------------------------------------------------

function setRunning(controller) {
  running = controller;
  sendButton.disabled = controller !== null;
  stopButton.disabled = controller === null;
  document.body.classList.toggle("busy", controller !== null);
  if (controller === null) input.focus();
}

function submit() {
  const text = input.value.trim();
  if (!text || running) return;
  input.value = "";
  fitInput();
  send(text);
}

function fitInput() {
  input.style.height = "auto";
  input.style.height = `${input.scrollHeight}px`;
}

function newChat() {
  if (running) running.abort();
  conversation = [];
  for (const bubble of log.querySelectorAll(".msg")) bubble.remove();
  $("empty").hidden = false;
  input.focus();
}

async function showModel() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const card = (await response.json()).data[0];
    $("model").textContent = `${card.id} · ${card.canvas_length}-token canvas`;
  } catch (e) {
    $("model").textContent = `cannot reach the server (${e.message})`;
  }
}

function toggleSettings() {
  const open = document.body.classList.toggle("settings-open");
  $("toggle-settings").setAttribute("aria-expanded", String(open));
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
input.addEventListener("input", fitInput);
stopButton.addEventListener("click", () => running && running.abort());
$("new-chat").addEventListener("click", newChat);
$("toggle-settings").addEventListener("click", toggleSettings);
for (const id of FIELDS) $(id).addEventListener("change", saveSettings);

loadSettings();
showModel();
input.focus();
