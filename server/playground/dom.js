// The page's elements by role, and a small element builder: nodes and text, never HTML strings.

export const $ = (id) => document.getElementById(id);

export const ui = {
  keyForm: $("key-form"),
  key: $("api-key"),
  forgetKey: $("forget-key"),
  compose: $("compose"),
  prompt: $("prompt"),
  model: $("model"),
  loras: $("loras"),
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

/** A new element: attrs are attributes (or properties, for non-string values), children are nodes or text. */
export function el(tag, attrs = {}, ...children) {
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

export function setStatus(text) {
  ui.status.textContent = text;
}

/** A secondary button that calls onClick; `label` is its accessible name when the text is not enough. */
export function button(text, onClick, label) {
  const b = el("button", { type: "button", class: "secondary", text, "aria-label": label });
  b.addEventListener("click", onClick);
  return b;
}
