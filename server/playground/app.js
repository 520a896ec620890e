// The playground: a conversation with the model through the public API only.
//
// A prompt goes to /v1/chat/completions with `stream: true` (progress bars and previews come from
// its progress chunks), carrying the conversation so far: the API edits the latest picture in it,
// so the next prompt refines the last answer (README, "Editing"). A dropped, pasted or chosen
// picture is attached to the next message; with a painted mask the request goes to
// /v1/images/edits instead, which is the route that takes a mask.

import { ApiError, ConnectionError, PLAIN_TIMEOUT_MS, call, dataUrlBlob, inBandError, pictureBlob, sseData } from "./api.js";
import { history, renderTurn, showAnswer, showProgress, showWaiting, userMessage } from "./conversation.js";
import { el, setStatus, ui } from "./dom.js";
import { InputError, clearError, clearErrors, clearOnInput, showError } from "./errors.js";
import { MaskPainter } from "./mask.js";

const KEY_STORAGE = "kiln.playground.apiKey";

const state = {
  turns: [], // {prompt, attachment, maskUrl, request, images: [{url, seed}], text, status}
  attachment: null, // {url, name}: the picture the next request edits
  controller: null, // the AbortController of the request in flight
};

const painter = new MaskPainter(ui.maskCanvas, ui.attachmentImage, ui.brush, showAttachmentCaption);

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

let loraNames = new Map(); // model id -> the LoRAs /v1/models lists for it

async function loadModels() {
  clearError(ui.key);
  clearError(ui.model);
  const previous = ui.model.value;
  const response = await call("/v1/models", { key: currentKey() });
  const { data } = await response.json();
  loraNames = new Map(data.map((m) => [m.id, m.loras || []]));
  ui.model.replaceChildren(...data.map((m) => el("option", { value: m.id, text: m.id })));
  if (data.some((m) => m.id === previous)) ui.model.value = previous;
  showLoras();
  return data;
}

/** The chosen model's LoRAs, each a button that adds `<lora:NAME:0.8>` to the prompt (README, "LoRAs"). */
function showLoras() {
  const names = loraNames.get(ui.model.value) || [];
  ui.loras.hidden = names.length === 0;
  ui.loras.replaceChildren(
    "LoRAs: ",
    ...names.flatMap((name, i) => {
      const add = el("button", { type: "button", class: "link", text: name, "aria-label": `Add the LoRA ${name} to the prompt` });
      add.addEventListener("click", () => {
        const prompt = ui.prompt.value.trimEnd();
        ui.prompt.value = `${prompt}${prompt ? " " : ""}<lora:${name}:0.8>`;
        ui.prompt.focus();
      });
      return i ? [", ", add] : [add];
    }),
  );
}

let checking = null; // {key, done}: the key being tried (Enter fires both the form's submit and the field's change)

/** Load the models with the key; `quiet`: on opening the page, a missing key is a hint, not an error. */
function useKey({ quiet = false } = {}) {
  const key = ui.key.value.trim();
  if (checking && checking.key === key) return checking.done;
  const done = (async () => {
    try {
      const models = await loadModels();
      setStatus(`Connected: ${models.length} model name${models.length === 1 ? "" : "s"}.`);
    } catch (e) {
      if (quiet && e instanceof ApiError && e.status === 401) setStatus("Enter the API key to start.");
      else showError(e);
    } finally {
      checking = null;
    }
  })();
  checking = { key, done };
  return done;
}

// ---- reading the controls ----------------------------------------------------------------------

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

// ---- the picture to edit -----------------------------------------------------------------------

/** Whether the next request edits a picture (an attached one, or the conversation's latest). */
function hasPicture() {
  return Boolean(state.attachment) || state.turns.some((t) => t.status === "done" && t.images.length);
}

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
    showAnswer(turn, attach);
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
  const body = { ...params, messages: [...history(state.turns), userMessage(turn.prompt, turn.attachment)], stream: true };
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
        if (part.type === "image_url") turn.images.push({ url: hostedHere(part.image_url.url) });
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
  turn.images = answer.data.map((d) => ({ url: d.url ? hostedHere(d.url) : `data:image/png;base64,${d.b64_json}`, seed: d.seed }));
  turn.text = "Edited with the painted mask.";
}

/** A hosted picture's URL on this page's own origin. The server names its pictures by its configured
 * address (say 127.0.0.1), which may not be the one this page was opened at (localhost, a LAN
 * name): the CSP shows pictures of this origin only, and the API recognises its pictures by path. */
function hostedHere(url) {
  if (url.startsWith("data:")) return url;
  const { pathname } = new URL(url, window.location.href);
  return pathname.includes("/v1/images/files/") ? window.location.origin + pathname : url;
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
  ui.model.addEventListener("change", showLoras);
  ui.size.addEventListener("change", () => {
    ui.sizeCustomField.hidden = ui.size.value !== "custom";
    if (!ui.sizeCustomField.hidden) ui.sizeCustom.focus();
  });
  clearOnInput();

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
  useKey({ quiet: !ui.key.value }); // a server without keys needs none
}

start();
