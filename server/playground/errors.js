// API errors shown next to the control they name (`param`), in plain words, with Retry-After
// counted down; errors found before sending are shown the same way.

import { ApiError, ConnectionError } from "./api.js";
import { $, ui } from "./dom.js";

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
  [/^loras/, ui.prompt], // the page asks for LoRAs with <lora:NAME:SCALE> in the prompt
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

let countdown = null; // the Retry-After timer

export class InputError extends Error {
  constructor(control, message) {
    super(message);
    this.control = control;
  }
}

export function clearError(control) {
  const line = ERROR_LINE.get(control);
  if (line) {
    line.hidden = true;
    line.textContent = "";
  }
  control.removeAttribute("aria-invalid");
}

export function clearErrors() {
  for (const control of ERROR_LINE.keys()) clearError(control);
  if (countdown) clearInterval(countdown);
  countdown = null;
}

function sentence(text) {
  const t = String(text || "").trim();
  if (!t) return "";
  return t[0].toUpperCase() + t.slice(1) + (/[.!?]$/.test(t) ? "" : ".");
}

function attached() {
  return !ui.attachment.hidden;
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
          ? "The server did not accept this API key (401). Check it against the key that make serve printed, or one listed in KILN_API_KEYS, and enter it again."
          : "This server needs an API key (401). Enter the key that make serve printed, or one listed in KILN_API_KEYS.",
      ];
    case 429:
      return [ui.generate, `The server is busy: its queue is full (429).${wait}`];
    case 503:
      return [ui.generate, `No engine worker is ready right now (503): it may be starting, restarting or shutting down.${wait}`];
    case 504:
      return [ui.generate, "The picture took longer than the server's time limit (504). Try fewer steps, fewer images or a smaller size."];
    case 413:
      return [attached() ? ui.paintMask : ui.prompt, "The request is larger than this server accepts (413): try a smaller picture."];
    default:
      break;
  }
  const match = PARAM_FIELDS.find(([pattern]) => error.param && pattern.test(error.param));
  let control = match ? match[1] : ui.generate;
  if (error.code === "model_not_found") control = ui.model;
  if (control === ui.size && ui.size.value === "custom") control = ui.sizeCustom;
  if (control === ui.paintMask && !attached()) control = ui.prompt;
  const status = error.status ? ` (${error.status})` : "";
  if (error.status >= 500) return [control, `The server failed while making the picture${status}: ${sentence(error.message)}`];
  return [control, sentence(error.message) + status];
}

export function showError(error) {
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
  countdown = setInterval(() => {
    left -= 1;
    if (left <= 0) {
      clearInterval(countdown);
      countdown = null;
      line.textContent = message.replace(/ Try again in \d+ s\./, " You can try again now.");
    } else {
      line.textContent = message.replace(/in \d+ s\./, `in ${left} s.`);
    }
  }, 1000);
}

/** An error line goes away once its control is changed. */
export function clearOnInput() {
  for (const control of ERROR_LINE.keys()) {
    if (control !== ui.generate && control !== ui.paintMask) control.addEventListener("input", () => clearError(control));
  }
}
