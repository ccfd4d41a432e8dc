// What every page shares: the bundle the page is about (?bundle=NAME in its address, carried by every link and API
// call; absent: the server's default bundle), calls to the JSON API (with the API key when the server asks for
// one), following a job or batch as server-sent events, shading tokens by activation, and small formatting helpers.
"use strict";

const KEY_STORE = "dreaming-api-key";
const BUNDLE = new URLSearchParams(location.search).get("bundle"); // null: the default bundle
let keyRequired = false; // the server's answer (GET /v1/info): do its POST endpoints need the key?

// The element with this id; pages fail loudly if their HTML lacks one.
function $(id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`no element #${id}`);
  return element;
}

// A new element: el("td", {class: "num"}, "12.3%", child...).
function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) element.setAttribute(name, value);
  }
  for (const child of children) element.append(child);
  return element;
}

function percent(fraction) {
  return fraction === null || fraction === undefined ? "–" : `${(100 * fraction).toFixed(1)}%`;
}

function number(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

// A page's address in this page's bundle: `path` with ?bundle=NAME added when the page has one.
function pageUrl(path) {
  if (!BUNDLE) return path;
  const url = new URL(path, location.origin);
  url.searchParams.set("bundle", BUNDLE);
  return url.pathname + url.search;
}

// An API path (/v1/...) of this page's bundle: under /v1/bundles/NAME/ when the page has one.
function scoped(path) {
  return BUNDLE ? `/v1/bundles/${encodeURIComponent(BUNDLE)}${path.slice("/v1".length)}` : path;
}

function featureLink(feature) {
  const [layer, index] = feature.split("/");
  return el("a", {href: pageUrl(`/features/${layer}/${index}`), class: "feature"}, feature);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// ---------------------------------------------------------------------------------------------- the API key

function apiKey() {
  return localStorage.getItem(KEY_STORE);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? {...extra, "X-API-Key": key} : extra;
}

// Show the key form and resolve once the user has saved a key (calls waiting at the same time share one form).
let keyAsked = null;
function askForKey(message) {
  $("key-message").textContent = message;
  if (keyAsked) return keyAsked;
  const form = $("key-form");
  form.hidden = false;
  $("key-input").focus();
  keyAsked = new Promise((resolve) => {
    form.onsubmit = (event) => {
      event.preventDefault();
      localStorage.setItem(KEY_STORE, $("key-input").value.trim());
      form.hidden = true;
      keyAsked = null;
      resolve();
    };
  });
  return keyAsked;
}

function forgetKey() {
  localStorage.removeItem(KEY_STORE);
  $("key-state").textContent = "";
}

// A JSON call to the API, about this page's bundle (`scope`: false for a path about the server, e.g. /v1/bundles);
// asks for the key first when the call needs one and none is saved, and again on 401. Errors carry the API's
// `detail`.
async function api(path, {method = "GET", body, scope = true} = {}) {
  if (scope) path = scoped(path);
  if (method !== "GET" && keyRequired && !apiKey()) {
    await askForKey("This server needs an API key to search, test prompts and dream: enter it to go on.");
    showKeyState();
  }
  for (;;) {
    const response = await fetch(path, {
      method,
      headers: headers(body === undefined ? {} : {"Content-Type": "application/json"}),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      await askForKey(apiKey() ? "The saved API key was refused: enter the server's key." :
        "This server needs an API key for this action: enter it to go on.");
      showKeyState();
      continue;
    }
    const payload = await response.json().catch(() => null);
    if (!response.ok) {
      const detail = payload && payload.detail;
      throw new Error(typeof detail === "string" ? detail : `${response.status} ${JSON.stringify(detail)}`);
    }
    return payload;
  }
}

function showKeyState() {
  const state = $("key-state");
  state.replaceChildren();
  if (apiKey()) {
    const forget = el("button", {type: "button", class: "link"}, "forget key");
    forget.onclick = forgetKey;
    state.append("API key saved · ", forget);
  }
}

// The server's info (bundle, limits, dream defaults); tells the pages whether the key is needed and, if none is
// saved yet, offers the key form at once.
async function serverInfo() {
  const info = await api("/v1/info");
  keyRequired = info.api_key_required;
  if (keyRequired && !apiKey()) {
    askForKey("This server needs an API key to search, test prompts and dream: enter it here.").then(showKeyState);
  }
  return info;
}

// A dream config: the JSON of the "more settings" box `id` (any DreamConfig field), under the fields given.
function dreamConfig(id, fields) {
  const text = $(id).value.trim();
  let extra = {};
  try {
    extra = text ? JSON.parse(text) : {};
  } catch (error) {
    throw new Error(`more settings must be a JSON object of dream config fields: ${error.message}`);
  }
  if (typeof extra !== "object" || Array.isArray(extra) || extra === null) {
    throw new Error("more settings must be a JSON object of dream config fields, e.g. {\"population\": 4}");
  }
  return {...extra, ...fields};
}

// ------------------------------------------------------------------------------------------ event streams

// Follow a server-sent-event stream (fetch, so the key header goes with it): onUpdate(data) per `update` event,
// until the server ends the stream. Resolves with the last update.
async function follow(path, onUpdate) {
  path = scoped(path);
  const response = await fetch(path, {headers: headers({Accept: "text/event-stream"})});
  if (!response.ok) {
    const payload = await response.json().catch(() => null);
    throw new Error((payload && payload.detail) || `${response.status} on ${path}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return last;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data) {
        last = JSON.parse(data);
        onUpdate(last);
      }
    }
  }
}

// The badge of a positional feature, explained on hover.
const FIRST_TOKEN_NOTE = "Positional: its top dataset example is a text's first token, where it fires whatever " +
  "follows. A prompt reaches that max only when nothing comes before it, so in the default (chat) template it " +
  "is dreamed in the bare template {prompt} instead.";

function firstTokenBadge() {
  return el("span", {class: "tag first-token", title: FIRST_TOKEN_NOTE}, "fires on a text's first token");
}

// ------------------------------------------------------------------------------------------------ tokens

// Visible text of a token: whitespace made visible where it would vanish.
function tokenText(text) {
  return text.replaceAll("\n", "↵").replaceAll("\t", "→");
}

// Tokens shaded by activation relative to `scale` (the dataset max): each a span with its value and % of max
// on hover (and in data-activation). `marked`: the index drawn as the max token.
function shadeTokens(tokens, activations, scale, marked = null) {
  const line = el("span", {class: "tokens"});
  tokens.forEach((text, i) => {
    const value = activations[i];
    const strength = scale > 0 ? Math.max(0, Math.min(1, value / scale)) : 0;
    const token = el("span", {
      class: i === marked ? "tok max" : "tok",
      "data-activation": String(value),
      title: `${value.toFixed(3)} (${percent(scale > 0 ? value / scale : null)} of max)`,
      style: strength > 0 ? `background: rgba(234, 88, 12, ${(0.12 + 0.88 * strength).toFixed(3)})` : null,
    }, tokenText(text));
    line.append(token);
  });
  return line;
}

// The frame every page has, put before its <main>: navigation, the key state, the key form and the error line.
function pageFrame() {
  const header = el("header", {},
    el("a", {href: pageUrl("/"), class: "brand"}, "dreaming"),
    el("nav", {}, el("a", {href: pageUrl("/")}, "Search & browse"), el("a", {href: pageUrl("/batch")}, "Batch"),
      el("a", {href: "/docs"}, "API")),
    el("span", {id: "key-state"}));
  const keyForm = el("form", {id: "key-form", class: "panel inline", hidden: ""},
    el("span", {id: "key-message"}),
    el("input", {id: "key-input", type: "password", placeholder: "API key", autocomplete: "off"}),
    el("button", {type: "submit"}, "Save key"));
  const main = document.querySelector("main");
  main.before(header);
  main.prepend(keyForm, el("div", {id: "error", class: "error", hidden: ""}));
  showKeyState();
}

// `handler` (async) with its errors shown on the page rather than thrown: for event listeners and a page's start.
// The handler runs at once (an event's preventDefault still counts), an async one until its first await.
function guarded(handler) {
  const show = (error) => showError(error.message || String(error));
  return (...args) => {
    try {
      return Promise.resolve(handler(...args)).catch(show);
    } catch (error) {
      show(error);
    }
  };
}
