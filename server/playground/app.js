// The playground: a conversation with the model through the public API only.
//
// A prompt goes to /v1/chat/completions with `stream: true` (progress bars and previews come from
// its progress chunks), carrying the conversation so far: the API edits the latest picture in it,
// so the next prompt refines the last answer (README, "Editing"). A dropped, pasted or chosen
// picture is attached to the next message; with a painted mask the request goes to
// /v1/images/edits instead, which is the route that takes a mask.

import { ApiError, ConnectionError, PLAIN_TIMEOUT_MS, call, dataUrlBlob, inBandError, pictureBlob, sseData } from "./api.js";
import { MaskPainter } from "./mask.js";
import { curl, python } from "./snippets.js";

const KEY_STORAGE = "kiln.playground.apiKey";
const $ = (id) => document.getElementById(id);

const ui = {
  keyForm: $("key-form"),
  key: $("api-key"),
  forgetKey: $("forget-key"),
  compose: $("compose"),
  prompt: $("prompt"),
  model: $("model"),
  size: $("size"),
  sizeCustomField: $("size-custom-field"),
  sizeCustom: $("size-custom"),
  n: $("n"),
  steps: $("steps"),
  seed: $("seed"),
  guidance: $("guidance"),
  negative: $("negative-prompt"),
  sampler: $("sampler"),
  strength: $("strength"),
  previews: $("previews"),
  advanced: $("advanced"),
  generate: $("generate"),
  cancel: $("cancel"),
  status: $("status"),
  turns: $("turns"),
  emptyNote: $("empty-note"),
  newConversation: $("new-conversation"),
  attachment: $("attachment"),
  attachmentImage: $("attachment-image"),
  attachmentCaption: $("attachment-caption"),
  attachButton: $("attach-button"),
  attachFile: $("attach-file"),
  paintMask: $("paint-mask"),
  clearMask: $("clear-mask"),
  removeAttachment: $("remove-attachment"),
  maskCanvas: $("mask-canvas"),
  brush: $("brush-size"),
};

// Which control an API error's `param` names, and the error line below it.
const PARAM_FIELDS = [
  [/^model$/, ui.model],
  [/^size$/, ui.size],
  [/^n$/, ui.n],
  [/^steps$/, ui.steps],
  [/^seed$/, ui.seed],
  [/^guidance/, ui.guidance],
  [/^negative_prompt$/, ui.negative],
  [/^sampler$/, ui.sampler],
  [/^strength$/, ui.strength],
  [/^(image|mask)/, ui.paintMask],
  [/^(prompt|messages)/, ui.prompt],
];
const ERROR_LINE = new Map([
  [ui.key, $("api-key-error")],
  [ui.prompt, $("prompt-error")],
  [ui.model, $("model-error")],
  [ui.size, $("size-error")],
  [ui.sizeCustom, $("size-error")],
  [ui.n, $("n-error")],
  [ui.steps, $("steps-error")],
  [ui.seed, $("seed-error")],
  [ui.guidance, $("guidance-error")],
  [ui.negative, $("negative-prompt-error")],
  [ui.sampler, $("sampler-error")],
  [ui.strength, $("strength-error")],
  [ui.paintMask, $("image-error")],
  [ui.generate, $("generate-error")],
]);

const state = {
  turns: [], // {prompt, attachment, maskUrl, request, images: [{url, seed}], text, status}
  attachment: null, // {url, name}: the picture the next request edits
  controller: null, // the AbortController of the request in flight
  countdown: null,
};

const painter = new MaskPainter(ui.maskCanvas, ui.attachmentImage, ui.brush, showAttachmentCaption);

// ---- small DOM helpers -------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function setStatus(text) {
  ui.status.textContent = text;
}

// ---- the API key -------------------------------------------------------------------------------

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: the key lives in the field only
  }
}

function currentKey() {
  const key = ui.key.value.trim();
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
  } catch {
    // storage disabled
  }
  return key;
}

function forgetKey() {
  try {
    localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled
  }
  ui.key.value = "";
  clearError(ui.key);
  setStatus("The API key was removed from this browser.");
  ui.key.focus();
}

async function loadModels() {
  clearError(ui.key);
  clearError(ui.model);
  const previous = ui.model.value;
  const response = await call("/v1/models", { key: currentKey() });
  const { data } = await response.json();
  ui.model.replaceChildren(...data.map((m) => el("option", { value: m.id, text: m.id })));
  if (data.some((m) => m.id === previous)) ui.model.value = previous;
  return data;
}

async function useKey() {
  try {
    const models = await loadModels();
    setStatus(`Connected: ${models.length} model name${models.length === 1 ? "" : "s"}.`);
  } catch (e) {
    showError(e);
  }
}

// ---- errors next to the control they name ------------------------------------------------------

function clearError(control) {
  const line = ERROR_LINE.get(control);
  if (line) {
    line.hidden = true;
    line.textContent = "";
  }
  control.removeAttribute("aria-invalid");
}

function clearErrors() {
  for (const control of ERROR_LINE.keys()) clearError(control);
  if (state.countdown) clearInterval(state.countdown);
  state.countdown = null;
}

function sentence(text) {
  const t = String(text || "").trim();
  if (!t) return "";
  return t[0].toUpperCase() + t.slice(1) + (/[.!?]$/.test(t) ? "" : ".");
}

/** The control an error belongs to, and what to tell the person. */
function describe(error) {
  if (error instanceof ConnectionError) {
    return [ui.generate, `Lost the connection to the server: ${error.message}. Is Kiln still running? Try again.`];
  }
  if (!(error instanceof ApiError)) {
    return [ui.generate, `Something went wrong in this page: ${error && error.message ? error.message : error}.`];
  }
  const wait = error.retryAfter !== null ? ` Try again in ${error.retryAfter} s.` : " Try again in a moment.";
  switch (error.status) {
    case 401:
      return [
        ui.key,
        ui.key.value.trim()
          ? "The server did not accept this API key (401). Check it against the key `make serve` printed, or one listed in KILN_API_KEYS, and enter it again."
          : "This server needs an API key (401). Enter the key `make serve` printed, or one listed in KILN_API_KEYS.",
      ];
    case 429:
      return [ui.generate, `The server is busy: its queue is full (429).${wait}`];
    case 503:
      return [ui.generate, `No engine worker is ready right now (503): it may be starting, restarting or shutting down.${wait}`];
    case 504:
      return [ui.generate, "The picture took longer than the server's time limit (504). Try fewer steps, fewer images or a smaller size."];
    case 413:
      return [state.attachment ? ui.paintMask : ui.prompt, "The request is larger than this server accepts (413): try a smaller picture."];
    default:
      break;
  }
  const match = PARAM_FIELDS.find(([pattern]) => error.param && pattern.test(error.param));
  let control = match ? match[1] : ui.generate;
  if (error.code === "model_not_found") control = ui.model;
  if (control === ui.size && ui.size.value === "custom") control = ui.sizeCustom;
  if (control === ui.paintMask && !state.attachment) control = ui.prompt;
  const status = error.status ? ` (${error.status})` : "";
  if (error.status >= 500) return [control, `The server failed while making the picture${status}: ${sentence(error.message)}`];
  return [control, sentence(error.message) + status];
}

function showError(error) {
  const [control, message] = error instanceof InputError ? [error.control, error.message] : describe(error);
  const line = ERROR_LINE.get(control);
  line.textContent = message;
  line.hidden = false;
  if (control !== ui.generate) {
    control.setAttribute("aria-invalid", "true");
    if (ui.advanced.contains(control)) ui.advanced.open = true;
    control.focus();
  }
  if (error instanceof ApiError && error.retryAfter) countDown(line, message, error.retryAfter);
  return message;
}

function countDown(line, message, seconds) {
  let left = seconds;
  state.countdown = setInterval(() => {
    left -= 1;
    if (left <= 0) {
      clearInterval(state.countdown);
      state.countdown = null;
      line.textContent = message.replace(/ Try again in \d+ s\./, " You can try again now.");
    } else {
      line.textContent = message.replace(/in \d+ s\./, `in ${left} s.`);
    }
  }, 1000);
}

// ---- reading the controls ----------------------------------------------------------------------

class InputError extends Error {
  constructor(control, message) {
    super(message);
    this.control = control;
  }
}

function number(control, { integer = true } = {}) {
  const raw = control.value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new InputError(control, `Enter ${integer ? "a whole number" : "a number"}, or leave it empty for the default.`);
  }
  return value;
}

function size() {
  if (ui.size.value !== "custom") return ui.size.value || undefined;
  const raw = ui.sizeCustom.value.trim().toLowerCase().replace("×", "x");
  if (!/^\d+x\d+$/.test(raw)) throw new InputError(ui.sizeCustom, "Write the size as width x height, say 384x256.");
  return raw;
}

/** The request's parameters, in the API's names; empty controls are left out (the model's defaults). */
function parameters(withPicture) {
  const p = {
    model: ui.model.value,
    n: number(ui.n),
    size: size(),
    steps: number(ui.steps),
    seed: number(ui.seed),
    guidance_scale: number(ui.guidance, { integer: false }),
    negative_prompt: ui.negative.value.trim() || undefined,
    sampler: ui.sampler.value || undefined,
    strength: withPicture ? number(ui.strength, { integer: false }) : undefined,
  };
  if (p.n === 1) delete p.n;
  for (const k of Object.keys(p)) if (p[k] === undefined) delete p[k];
  return p;
}

// ---- the conversation --------------------------------------------------------------------------

/** The chat history the API reads: completed turns only (README, "Editing": the latest picture is edited). */
function history() {
  const messages = [];
  for (const turn of state.turns) {
    if (turn.status !== "done") continue;
    messages.push(userMessage(turn.prompt, turn.attachment));
    messages.push({
      role: "assistant",
      content: [...turn.images.map((image) => ({ type: "image_url", image_url: { url: image.url } })), { type: "text", text: turn.text }],
    });
  }
  return messages;
}

function userMessage(prompt, attachment) {
  if (!attachment) return { role: "user", content: prompt };
  return { role: "user", content: [{ type: "text", text: prompt }, { type: "image_url", image_url: { url: attachment.url } }] };
}

function hasPicture() {
  return Boolean(state.attachment) || state.turns.some((t) => t.status === "done" && t.images.length);
}

function renderTurn(turn) {
  const userParts = [el("p", { class: "prompt-text", text: turn.prompt })];
  if (turn.attachment) {
    const sent = [el("img", { class: "thumb", src: turn.attachment.url, alt: "The picture sent to edit" })];
    if (turn.maskUrl) sent.push(el("img", { class: "thumb mask-thumb", src: turn.maskUrl, alt: "The mask sent (transparent = repaint)" }));
    const links = [el("a", { href: turn.attachment.url, download: "image.png", text: "image.png" })];
    if (turn.maskUrl) links.push(el("a", { href: turn.maskUrl, download: "mask.png", text: "mask.png" }));
    userParts.push(el("div", { class: "sent" }, ...sent), el("p", { class: "help" }, "Sent: ", ...links.flatMap((a, i) => (i ? [" and ", a] : [a]))));
  }
  turn.progress = el("div", { class: "progress-list" });
  turn.answer = el("div", { class: "answer" });
  turn.note = el("p", { class: "turn-note", "aria-live": "polite" });
  turn.node = el(
    "li",
    { class: "turn" },
    el("div", { class: "bubble user" }, el("h3", { class: "visually-hidden", text: "You" }), ...userParts),
    el("div", { class: "bubble assistant" }, el("h3", { class: "visually-hidden", text: "Kiln" }), turn.progress, turn.answer, turn.note),
  );
  ui.turns.append(turn.node);
  ui.emptyNote.hidden = true;
  turn.node.scrollIntoView({ block: "end", behavior: "smooth" });
}

/** One progress bar (and preview) per image, from the stream's progress chunks. */
function showProgress(turn, { image_index: k, step, total_steps: total, preview }) {
  turn.bars = turn.bars || [];
  if (!turn.bars[k]) {
    const bar = el("progress", { max: total, value: 0, "aria-label": `Image ${k + 1} progress` });
    const label = el("span", { class: "step", text: "" });
    const img = el("img", { class: "preview", alt: `Preview of image ${k + 1}`, hidden: true });
    turn.bars[k] = { bar, label, img };
    turn.progress.append(el("div", { class: "progress-item" }, img, el("div", { class: "row" }, bar, label)));
  }
  const { bar, label, img } = turn.bars[k];
  bar.max = total;
  bar.value = step;
  label.textContent = `Image ${k + 1}: step ${step} of ${total}`;
  if (preview) {
    img.src = preview;
    img.hidden = false;
  }
}

function showWaiting(turn, text) {
  turn.progress.replaceChildren(el("div", { class: "progress-item" }, el("div", { class: "row" }, el("progress", { "aria-label": text }), el("span", { class: "step", text }))));
}

function showAnswer(turn) {
  turn.progress.replaceChildren();
  const seconds = (turn.elapsed / 1000).toFixed(1);
  const figures = turn.images.map((image, k) => {
    const caption = el("figcaption", {});
    const img = el("img", { class: "result", src: image.url, alt: turn.prompt, decoding: "async" });
    const describeImage = () => {
      const dims = img.naturalWidth ? `${img.naturalWidth}×${img.naturalHeight}` : turn.size || "";
      caption.replaceChildren(
        el("span", { text: [image.seed !== undefined ? `seed ${image.seed}` : null, dims, `${seconds} s`].filter(Boolean).join(" · ") }),
      );
    };
    img.addEventListener("load", describeImage);
    img.addEventListener("error", () => caption.replaceChildren(el("span", { class: "error-text", text: "This picture could not be loaded (hosted pictures expire)." })));
    describeImage();
    const actions = el(
      "div",
      { class: "buttons" },
      el("a", { class: "button secondary", href: image.url, download: `kiln-${image.seed ?? k}.png`, text: "Download" }),
      button("Edit this", () => attach({ url: image.url, name: `picture ${k + 1} of “${turn.prompt}”` }, false), `Edit picture ${k + 1}`),
      button("Paint mask", () => attach({ url: image.url, name: `picture ${k + 1} of “${turn.prompt}”` }, true), `Paint a mask on picture ${k + 1}`),
    );
    return el("figure", { class: "result-figure" }, img, caption, actions);
  });
  const snippet = el("pre", { class: "snippet", hidden: true, tabindex: "0" });
  const copied = el("span", { class: "help", "aria-live": "polite" });
  const origin = window.location.origin;
  const tools = el(
    "div",
    { class: "buttons" },
    button("Copy as curl", () => copy(curl(origin, turn.request), snippet, copied)),
    button("Copy as Python (openai)", () => copy(python(origin, turn.request), snippet, copied)),
    copied,
  );
  turn.answer.replaceChildren(el("div", { class: "results" }, ...figures), tools, snippet);
  turn.note.textContent = turn.text && turn.request.route === "chat" ? turn.text : "";
}

function button(text, onClick, label) {
  const b = el("button", { type: "button", class: "secondary", text, "aria-label": label });
  b.addEventListener("click", onClick);
  return b;
}

async function copy(text, pre, note) {
  pre.textContent = text;
  pre.hidden = false;
  try {
    await navigator.clipboard.writeText(text);
    note.textContent = "Copied to the clipboard (the key is read from $KILN_API_KEY).";
  } catch {
    const range = document.createRange(); // no clipboard (a plain-http page elsewhere than localhost)
    range.selectNodeContents(pre);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    pre.focus();
    note.textContent = "Selected below: press Ctrl+C (⌘C) to copy.";
  }
}

// ---- the picture to edit -----------------------------------------------------------------------

function attach(attachment, paint) {
  state.attachment = attachment;
  ui.attachment.hidden = false;
  ui.attachmentImage.src = attachment.url;
  setPainting(paint);
  clearError(ui.paintMask);
  ui.attachment.scrollIntoView({ block: "nearest" });
  (paint ? ui.maskCanvas : ui.prompt).focus({ preventScroll: true });
}

function detach() {
  state.attachment = null;
  ui.attachment.hidden = true;
  ui.attachmentImage.removeAttribute("src");
  setPainting(false);
}

function setPainting(on) {
  ui.paintMask.setAttribute("aria-pressed", String(on));
  ui.maskCanvas.hidden = !on;
  ui.clearMask.disabled = !on;
  ui.brush.disabled = !on;
  showAttachmentCaption();
}

function painting() {
  return Boolean(state.attachment) && !ui.maskCanvas.hidden && painter.painted;
}

function showAttachmentCaption() {
  if (!state.attachment) return;
  const img = ui.attachmentImage;
  const dims = img.naturalWidth ? ` (${img.naturalWidth}×${img.naturalHeight})` : "";
  const what = painting()
    ? "the painted part is redrawn by the next prompt."
    : !ui.maskCanvas.hidden
      ? "paint over the part to redraw."
      : "the next prompt changes this picture.";
  ui.attachmentCaption.textContent = `${state.attachment.name}${dims}: ${what}`;
}

function readFile(file) {
  if (!file || !/^image\/(png|jpeg|webp)$/.test(file.type)) {
    showError(new InputError(state.attachment ? ui.paintMask : ui.prompt, "Pictures must be PNG, JPEG or WebP files."));
    return;
  }
  const reader = new FileReader(); // a data: URL: what the chat API takes, and what this page's CSP shows
  reader.addEventListener("load", () => attach({ url: reader.result, name: file.name || "pasted picture" }, false));
  reader.readAsDataURL(file);
}

function firstImageFile(items) {
  for (const item of items || []) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file && file.type.startsWith("image/")) return file;
  }
  return null;
}

// ---- generating --------------------------------------------------------------------------------

function setBusy(controller) {
  state.controller = controller;
  ui.generate.disabled = Boolean(controller);
  ui.cancel.disabled = !controller;
  ui.compose.setAttribute("aria-busy", String(Boolean(controller)));
}

async function generate() {
  if (state.controller) return;
  clearErrors();
  const prompt = ui.prompt.value.trim();
  if (!prompt) {
    showError(new InputError(ui.prompt, "Describe the picture first."));
    return;
  }
  const controller = new AbortController();
  setBusy(controller);
  let turn = null;
  try {
    if (!ui.model.value) await loadModels();
    const params = parameters(hasPicture());
    const mask = painting() ? painter.maskDataUrl() : null;
    turn = { prompt, attachment: state.attachment, maskUrl: mask, images: [], text: "", status: "running", size: params.size };
    state.turns.push(turn);
    renderTurn(turn);
    setStatus("Generating…");
    const started = performance.now();
    if (mask) await runEdit(turn, params, controller.signal);
    else await runChat(turn, params, controller.signal);
    turn.elapsed = performance.now() - started;
    turn.status = "done";
    showAnswer(turn);
    setStatus(`Done in ${(turn.elapsed / 1000).toFixed(1)} s.`);
    ui.prompt.value = "";
    if (turn.attachment) detach();
    ui.prompt.focus({ preventScroll: true });
  } catch (e) {
    if (turn) turn.status = "failed";
    if (controller.signal.aborted) {
      if (turn) {
        turn.progress.replaceChildren();
        turn.note.textContent = "Cancelled.";
      }
      setStatus("Cancelled.");
    } else {
      const message = showError(e);
      if (turn) {
        turn.progress.replaceChildren();
        turn.note.textContent = `Failed: ${message}`;
        turn.note.classList.add("error-text");
      }
      setStatus("Failed.");
    }
  } finally {
    setBusy(null);
  }
}

async function runChat(turn, params, signal) {
  const body = { ...params, messages: [...history(), userMessage(turn.prompt, turn.attachment)], stream: true };
  if (ui.previews.checked) body.preview_every = params.steps ? Math.max(1, Math.ceil(params.steps / 10)) : 2;
  turn.request = { route: "chat", body: reorder(body) };
  const response = await call("/v1/chat/completions", { key: currentKey(), method: "POST", json: turn.request.body, signal });
  for await (const chunk of sseData(response, signal)) {
    if (chunk.error) throw inBandError(chunk.error);
    if (chunk.progress) showProgress(turn, chunk.progress);
    if (chunk.seeds) turn.images.forEach((image, k) => (image.seed = chunk.seeds[k]));
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      const parts = [...(Array.isArray(delta.content) ? delta.content : []), ...(delta.images || [])];
      for (const part of parts) {
        if (part.type === "image_url") turn.images.push({ url: part.image_url.url });
        else if (part.type === "text") turn.text += part.text;
      }
      if (typeof delta.content === "string") turn.text += delta.content;
    }
  }
  if (!turn.images.length) throw new ConnectionError({ message: "the answer ended without a picture" });
}

async function runEdit(turn, params, signal) {
  showWaiting(turn, "Editing… (no step-by-step progress on this route)");
  const fields = { prompt: turn.prompt, ...params };
  turn.request = { route: "edit", fields, files: { image: turn.attachment.url, mask: turn.maskUrl } };
  const form = new FormData();
  form.append("image", await pictureBlob(turn.attachment.url, signal), "image.png");
  form.append("mask", dataUrlBlob(turn.maskUrl), "mask.png");
  for (const [k, v] of Object.entries(fields)) form.append(k, String(v));
  const timeout = AbortSignal.timeout(PLAIN_TIMEOUT_MS);
  const response = await call("/v1/images/edits", { key: currentKey(), method: "POST", form, signal: AbortSignal.any([signal, timeout]) }).catch((e) => {
    if (timeout.aborted && !signal.aborted) throw new ConnectionError({ message: `no answer within ${PLAIN_TIMEOUT_MS / 60000} minutes` });
    throw e;
  });
  const answer = await response.json();
  turn.images = answer.data.map((d) => ({ url: d.url || `data:image/png;base64,${d.b64_json}`, seed: d.seed }));
  turn.text = "Edited with the painted mask.";
}

/** model and messages first: the copied snippets read in the usual order. */
function reorder(body) {
  const { model, messages, ...rest } = body;
  return { model, messages, ...rest };
}

// ---- wiring ------------------------------------------------------------------------------------

function start() {
  ui.key.value = storedKey();
  ui.keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    useKey();
  });
  ui.key.addEventListener("change", () => {
    if (ui.key.value.trim()) useKey();
  });
  ui.forgetKey.addEventListener("click", forgetKey);

  ui.compose.addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.compose.requestSubmit();
    }
  });
  ui.cancel.addEventListener("click", () => state.controller && state.controller.abort());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) state.controller.abort();
  });
  ui.size.addEventListener("change", () => {
    ui.sizeCustomField.hidden = ui.size.value !== "custom";
    if (!ui.sizeCustomField.hidden) ui.sizeCustom.focus();
  });
  for (const control of ERROR_LINE.keys()) {
    if (control !== ui.generate && control !== ui.paintMask) control.addEventListener("input", () => clearError(control));
  }

  ui.newConversation.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.turns = [];
    ui.turns.replaceChildren();
    ui.emptyNote.hidden = false;
    detach();
    clearErrors();
    setStatus("New conversation: the next prompt draws from scratch.");
    ui.prompt.focus();
  });

  ui.attachButton.addEventListener("click", () => ui.attachFile.click());
  ui.attachFile.addEventListener("change", () => {
    readFile(ui.attachFile.files[0]);
    ui.attachFile.value = "";
  });
  ui.removeAttachment.addEventListener("click", () => {
    detach();
    ui.prompt.focus();
  });
  ui.paintMask.addEventListener("click", () => {
    setPainting(ui.maskCanvas.hidden);
    if (!ui.maskCanvas.hidden) ui.maskCanvas.focus();
  });
  ui.clearMask.addEventListener("click", () => painter.clear());
  ui.attachmentImage.addEventListener("load", () => painter.reset());

  document.addEventListener("dragover", (e) => {
    if ([...(e.dataTransfer?.types || [])].includes("Files")) {
      e.preventDefault();
      document.body.classList.add("dropping");
    }
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) document.body.classList.remove("dropping");
  });
  document.addEventListener("drop", (e) => {
    document.body.classList.remove("dropping");
    const file = firstImageFile(e.dataTransfer?.files);
    if (file) {
      e.preventDefault();
      readFile(file);
    }
  });
  document.addEventListener("paste", (e) => {
    const file = firstImageFile(e.clipboardData?.items);
    if (file) {
      e.preventDefault();
      readFile(file);
    }
  });

  setPainting(false);
  if (ui.key.value) useKey();
}

start();
