// Runs the playground page's own script (dsv32/api/playground/playground.js) in Node against a running
// server: a minimal stand-in for the browser's DOM (the elements index.html declares, by id), the real
// fetch pointed at the server. Types a message, presses Send, waits for the reply, prints what the page shows.
// usage: node playground_page.js SERVER_URL API_KEY MESSAGE [MAX_TOKENS [stop]]
// ("stop": press Stop once the reply has started)
"use strict";
const fs = require("fs");
const path = require("path");
const vm = require("vm");

const [base, apiKey, message, maxTokens = "12", action = ""] = process.argv.slice(2);
const dir = path.join(__dirname, "..", "..", "dsv32", "api", "playground");
const html = fs.readFileSync(path.join(dir, "index.html"), "utf8");

class Element {
  constructor(tag, id = "") {
    Object.assign(this, { tag, id, children: [], listeners: {}, value: "", checked: false, disabled: false,
                          className: "", open: false, _text: "", scrollTop: 0, scrollHeight: 0 });
  }
  set textContent(t) { this._text = String(t); this.children = []; }
  get textContent() { return this._text + this.children.map((c) => c.textContent).join(""); }
  appendChild(c) { this.children.push(c); return c; }
  append(...cs) { cs.forEach((c) => this.appendChild(c)); }
  replaceChildren() { this.children = []; this._text = ""; }
  addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
  fire(type, ev = {}) { for (const fn of this.listeners[type] || []) fn({ preventDefault() {}, ...ev }); }
  dump() {
    return { tag: this.tag, className: this.className, text: this._text, children: this.children.map((c) => c.dump()) };
  }
}

const elements = {};
for (const m of html.matchAll(/<(\w+)[^>]*\sid="([^"]+)"[^>]*>/g)) {
  const el = new Element(m[1], m[2]);
  const value = /\svalue="([^"]*)"/.exec(m[0]);
  if (value) el.value = value[1];
  el.disabled = /\sdisabled[\s>]/.test(m[0]);
  elements[m[2]] = el;
}
const document = {
  getElementById: (id) => {
    if (!elements[id]) throw new Error(`the script asks for #${id}, which index.html does not have`);
    return elements[id];
  },
  createElement: (tag) => new Element(tag),
};
const store = {};
const context = {
  document, console, TextDecoder, performance, AbortController, JSON, Promise,
  localStorage: { getItem: (k) => store[k] ?? null, setItem: (k, v) => { store[k] = String(v); } },
  fetch: (url, opts) => fetch(base + url, opts), // the page calls its own origin
};
vm.createContext(context);
vm.runInContext(fs.readFileSync(path.join(dir, "playground.js"), "utf8"), context, { filename: "playground.js" });

(async () => {
  const $ = (id) => elements[id];
  $("api_key").value = apiKey;
  $("temperature").value = "0";
  $("max_tokens").value = maxTokens;
  $("input").value = message;
  $("send").fire("click"); // send() disables the button before its first await, and enables it at the end
  if (!$("send").disabled) throw new Error("Send did not start a request");
  let beforeStop = null; // what the reply showed when Stop was pressed
  for (let i = 0; i < 1200 && $("send").disabled; i++) {
    if (action === "stop" && beforeStop === null && $("log").children[1].textContent.length > 0 && $("stop").disabled === false) {
      beforeStop = $("log").children[1].textContent;
      $("stop").fire("click");
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  await new Promise((r) => setTimeout(r, 200)); // the /health call that names the model
  const log = $("log").children.map((c) => ({ className: c.className, text: c.textContent }));
  console.log(JSON.stringify({ log, status: $("status").textContent, model: $("model").textContent,
                               sendDisabled: $("send").disabled, stored: store, beforeStop }));
})();
