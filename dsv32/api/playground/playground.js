// dsv32 web playground: a chat page over the server's own OpenAI-compatible routes.
//
// The first half is plain logic with no DOM (request bodies, the SSE reader, folding stream chunks into a
// reply); tests drive it from Node against the real server. The second half wires it to index.html.

"use strict";

/** The /chat/completions body for these settings and messages. */
function buildRequest(settings, messages) {
  const body = {
    model: settings.thinking ? "deepseek-reasoner" : "deepseek-chat",
    messages: (settings.system ? [{ role: "system", content: settings.system }] : []).concat(messages),
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: settings.maxTokens,
  };
  if (!settings.thinking) {
    body.temperature = settings.temperature;
    body.top_p = settings.topP;
  }
  if (settings.json) body.response_format = { type: "json_object" };
  return body;
}

/** Splits a server-sent-event byte stream (decoded text, any chunking) into the payloads of its data lines. */
class SSEReader {
  constructor() {
    this.buffer = "";
  }

  /** Feed decoded text; returns the complete events' data (strings; "[DONE]" included). */
  feed(text) {
    this.buffer += text.replace(/\r\n?/g, "\n");
    const out = [];
    let end;
    while ((end = this.buffer.indexOf("\n\n")) >= 0) {
      const event = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""));
      if (data.length) out.push(data.join("\n")); // lines starting with ":" are keep-alives
    }
    return out;
  }
}

/** An empty reply, to be filled by applyChunk. */
function newReply() {
  return { reasoning: "", content: "", toolCalls: [], finishReason: null, usage: null, error: null };
}

/** Fold one parsed stream chunk (or an error body) into the reply. */
function applyChunk(reply, chunk) {
  if (chunk.error) {
    reply.error = chunk.error.message || JSON.stringify(chunk.error);
    return reply;
  }
  if (chunk.usage) reply.usage = chunk.usage;
  for (const choice of chunk.choices || []) {
    const delta = choice.delta || {};
    if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
    if (delta.content) reply.content += delta.content;
    for (const call of delta.tool_calls || []) {
      const slot = (reply.toolCalls[call.index] ||= { id: "", name: "", arguments: "" });
      if (call.id) slot.id = call.id;
      if (call.function && call.function.name) slot.name += call.function.name;
      if (call.function && call.function.arguments) slot.arguments += call.function.arguments;
    }
    if (choice.finish_reason) reply.finishReason = choice.finish_reason;
  }
  return reply;
}

/** One line about a finished reply: tokens, prefix-cache hits, speed. */
function formatUsage(usage, seconds) {
  if (!usage) return "";
  const parts = [
    `prompt ${usage.prompt_tokens} tokens (cache hit ${usage.prompt_cache_hit_tokens ?? 0}, miss ${usage.prompt_cache_miss_tokens ?? usage.prompt_tokens})`,
    `completion ${usage.completion_tokens}`,
  ];
  if (seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
  return parts.join(" · ");
}

/**
 * Stream one chat completion into ``reply``: calls onUpdate(reply) as chunks arrive and returns it finished.
 * ``fetchImpl`` is window.fetch in the page and Node's fetch in tests; ``signal`` aborts (the server then
 * aborts the request and frees its cache; ``reply`` keeps what had come).
 */
async function streamChat({ baseUrl = "", apiKey = "", body, onUpdate = () => {}, signal, fetchImpl = fetch,
                            reply = newReply() }) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const resp = await fetchImpl(`${baseUrl}/chat/completions`, {
    method: "POST", headers, body: JSON.stringify(body), signal,
  });
  if (!resp.ok) {
    const body = await resp.json().catch(() => null); // the API's error body, or none
    applyChunk(reply, body && body.error ? body : { error: { message: `HTTP ${resp.status}` } });
    onUpdate(reply);
    return reply;
  }
  const reader = new SSEReader();
  const decoder = new TextDecoder();
  for await (const bytes of resp.body) {
    for (const data of reader.feed(decoder.decode(bytes, { stream: true }))) {
      if (data === "[DONE]") continue;
      applyChunk(reply, JSON.parse(data));
      onUpdate(reply);
    }
  }
  return reply;
}

if (typeof module !== "undefined") {
  module.exports = { buildRequest, SSEReader, newReply, applyChunk, formatUsage, streamChat };
}

// ---- the page ---------------------------------------------------------------------------------------

if (typeof document !== "undefined") {
  const $ = (id) => document.getElementById(id);
  const history = []; // the conversation sent with each request: {role, content}
  let controller = null;

  const settings = () => ({
    thinking: $("thinking").checked,
    system: $("system").value.trim(),
    temperature: Number($("temperature").value),
    topP: Number($("top_p").value),
    maxTokens: Number($("max_tokens").value),
    json: $("json").checked,
  });

  function bubble(role) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    $("log").appendChild(div);
    return div;
  }

  function render(div, reply) {
    div.replaceChildren();
    if (reply.reasoning) {
      const details = document.createElement("details");
      details.open = !reply.content;
      const summary = document.createElement("summary");
      summary.textContent = "reasoning";
      const pre = document.createElement("pre");
      pre.textContent = reply.reasoning;
      details.append(summary, pre);
      div.appendChild(details);
    }
    const text = document.createElement("pre");
    text.textContent = reply.content;
    div.appendChild(text);
    for (const call of reply.toolCalls.filter(Boolean)) {
      const pre = document.createElement("pre");
      pre.className = "tool";
      pre.textContent = `tool call ${call.name}(${call.arguments})`;
      div.appendChild(pre);
    }
    if (reply.error) {
      const err = document.createElement("p");
      err.className = "error";
      err.textContent = reply.error;
      div.appendChild(err);
    }
    $("log").scrollTop = $("log").scrollHeight;
  }

  async function send() {
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    bubble("user").textContent = text;
    history.push({ role: "user", content: text });
    const div = bubble("assistant");
    controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    const t0 = performance.now();
    const reply = newReply(); // filled as the stream comes: Stop or a broken connection keep what came
    try {
      localStorage.setItem("dsv32-api-key", $("api_key").value);
      await streamChat({
        apiKey: $("api_key").value.trim(), body: buildRequest(settings(), history),
        onUpdate: (r) => render(div, r), signal: controller.signal, reply,
      });
    } catch (e) {
      reply.error = e.name === "AbortError" ? "stopped" : String(e);
      render(div, reply);
    }
    if (reply.content || reply.toolCalls.length) history.push({ role: "assistant", content: reply.content });
    else history.pop(); // nothing came back: the user's turn is not kept either
    $("status").textContent = [reply.finishReason && `finish: ${reply.finishReason}`,
      formatUsage(reply.usage, (performance.now() - t0) / 1000)].filter(Boolean).join(" · ");
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }

  $("api_key").value = localStorage.getItem("dsv32-api-key") || "";
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => {
    history.length = 0;
    $("log").replaceChildren();
    $("status").textContent = "";
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      send();
    }
  });
  $("thinking").addEventListener("change", () => {
    // thinking mode ignores temperature and top_p (as DeepSeek's API does)
    for (const id of ["temperature", "top_p"]) $(id).disabled = $("thinking").checked;
  });
  fetch("/health").then((r) => r.json()).then((h) => ($("model").textContent = h.model)).catch(() => {});
}
