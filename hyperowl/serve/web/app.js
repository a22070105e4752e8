// hyperowl chat page. Design note: `history` holds the conversation in OpenAI message form (user turns as
// content parts with data: URLs, assistant turns as strings) and is sent whole each turn; answers are read
// from the server-sent event stream chunk by chunk. Stop aborts the fetch, which makes the server cancel
// the request. Nothing here depends on a build step or a library.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // [{role, content}], what the server sees
let pending = [];            // attachments for the next message: {kind, url, name}
let model = null;            // served model id
let controller = null;       // AbortController of the answer being streamed
const fileNames = new WeakMap();  // content part object -> the name of the file the user picked

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model-name").textContent = model;
  } catch (e) {
    $("model-name").textContent = "model list unavailable: " + e.message;
  }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(fr.error);
    fr.readAsDataURL(file);
  });
}

async function attach(files, kind) {
  for (const f of files) {
    const k = kind || (f.type.startsWith("video/") ? "video" : "image");
    if (k === "image" && !f.type.startsWith("image/")) continue;
    pending.push({ kind: k, url: await readAsDataURL(f), name: f.name || "pasted image" });
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  pending.forEach((a, i) => {
    const div = document.createElement("div");
    div.className = "att";
    if (a.kind === "image") {
      const img = document.createElement("img");
      img.src = a.url; img.alt = a.name;
      div.append(img);
    } else {
      const chip = document.createElement("span");
      chip.className = "chip"; chip.textContent = "video: " + a.name;
      div.append(chip);
    }
    const rm = document.createElement("button");
    rm.className = "remove"; rm.textContent = "×"; rm.title = "Remove";
    rm.onclick = () => { pending.splice(i, 1); renderAttachments(); };
    div.append(rm);
    box.append(div);
  });
}

function bubble(role, text, media) {
  $("empty-hint")?.remove();
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (media && media.length) {
    const m = document.createElement("div");
    m.className = "media";
    for (const a of media) {
      if (a.kind === "image") {
        const img = document.createElement("img");
        img.src = a.url; img.alt = a.name;
        m.append(img);
      } else {
        const chip = document.createElement("span");
        chip.className = "chip"; chip.textContent = "video: " + a.name;
        m.append(chip);
      }
    }
    div.append(m);
  }
  const t = document.createElement("div");
  t.className = "text";
  t.textContent = text;
  div.append(t);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// The server names a bad attachment by its place in the request (messages[6].content[0]); the user knows it
// by its file name: say that instead.
function errorText(body, fallback, messages) {
  if (!body || !body.error) return fallback;
  let text = body.error.message;
  for (const m of String(text).match(/messages\[\d+\]\.content\[\d+\]/g) || []) {
    const [, i, j] = m.match(/messages\[(\d+)\]\.content\[(\d+)\]/);
    const msg = messages[+i];
    const part = msg && Array.isArray(msg.content) ? msg.content[+j] : null;
    const name = part && fileNames.get(part);
    if (name) text = text.split(m).join(`"${name}"`);
  }
  return text;
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text && !pending.length) return;
  const media = pending;
  const parts = media.map((a) => {
    const part = a.kind === "image"
      ? { type: "image_url", image_url: { url: a.url } }
      : { type: "video_url", video_url: { url: a.url } };
    fileNames.set(part, a.name);
    return part;
  });
  if (text) parts.push({ type: "text", text });
  const userMsg = { role: "user", content: parts };
  const userBubble = bubble("user", text, media);
  $("prompt").value = "";
  pending = [];
  renderAttachments();

  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  const textEl = out.querySelector(".text");
  const body = {
    model: model || undefined,
    messages: history.concat([userMsg]),
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 256,
    temperature: parseFloat($("temperature").value) || 0,
  };
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let ttft = null, finish = null, usage = null, answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      let err = null;
      try { err = await r.json(); } catch (_) { /* not JSON */ }
      throw new Error(errorText(err, `HTTP ${r.status}`, body.messages));
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let idx;
      while ((idx = buf.indexOf("\n\n")) >= 0) {   // one SSE event per blank-line-terminated block
        const ev = buf.slice(0, idx);
        buf = buf.slice(idx + 2);
        for (const line of ev.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(errorText(msg, msg.error.message, body.messages));
          if (msg.usage) usage = msg.usage;
          for (const c of msg.choices || []) {
            if (c.delta && c.delta.content) {
              if (ttft === null) ttft = performance.now() - t0;
              answer += c.delta.content;
              textEl.textContent = answer;
              out.scrollIntoView({ block: "end" });
            }
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    history.push(userMsg, { role: "assistant", content: answer });
    const meta = document.createElement("div");
    meta.className = "meta";
    const bits = [`finish: ${finish}`];
    if (usage) {
      bits.push(`${usage.completion_tokens} tokens`);
      const d = usage.prompt_tokens_details || {};
      if (d.visual_tokens) bits.push(`${d.visual_tokens} visual tokens (${d.cached_visual_tokens || 0} cached)`);
    }
    if (ttft !== null) bits.push(`first token ${(ttft / 1000).toFixed(2)} s`);
    meta.textContent = bits.join(" · ");
    out.append(meta);
    if (!answer) textEl.textContent = "(empty answer)";
    out.dataset.state = "done";
  } catch (e) {
    out.dataset.state = "error";
    if (e.name === "AbortError") {
      textEl.textContent = (answer || "") + " [stopped]";
      history.push(userMsg, { role: "assistant", content: answer });
    } else {
      out.remove();
      userBubble.remove();  // the turn did not happen: it goes back to the composer, not into the history
      bubble("error", "Error: " + e.message).dataset.state = "error";
      pending = media;  // give the attachments back so the message can be fixed and re-sent
      renderAttachments();
      $("prompt").value = text;
    }
  } finally {
    controller = null;
    setBusy(false);
    $("status").textContent = "";
  }
}

function newChat() {
  if (controller) controller.abort();
  history.length = 0;
  pending = [];
  renderAttachments();
  $("messages").replaceChildren();
}

$("send").onclick = send;
$("stop").onclick = () => controller && controller.abort();
$("new-chat").onclick = newChat;
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); if (!controller) send(); }
});
$("image-input").onchange = (e) => { attach(e.target.files, "image"); e.target.value = ""; };
$("video-input").onchange = (e) => { attach(e.target.files, "video"); e.target.value = ""; };
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) { e.preventDefault(); attach(files, "image"); }
});
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  attach(e.dataTransfer.files);
});
$("api-key").addEventListener("change", loadModel);
loadModel();
