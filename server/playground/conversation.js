// The conversation: the chat history the API reads, and each turn's progress and answer.

import { button, el, ui } from "./dom.js";
import { curl, python } from "./snippets.js";

/** The chat history the API reads: completed turns only (README, "Editing": the latest picture is edited). */
export function history(turns) {
  const messages = [];
  for (const turn of turns) {
    if (turn.status !== "done") continue;
    messages.push(userMessage(turn.prompt, turn.attachment));
    messages.push({
      role: "assistant",
      content: [...turn.images.map((image) => ({ type: "image_url", image_url: { url: image.url } })), { type: "text", text: turn.text }],
    });
  }
  return messages;
}

export function userMessage(prompt, attachment) {
  if (!attachment) return { role: "user", content: prompt };
  return { role: "user", content: [{ type: "text", text: prompt }, { type: "image_url", image_url: { url: attachment.url } }] };
}

export function renderTurn(turn) {
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
export function showProgress(turn, { image_index: k, step, total_steps: total, preview }) {
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

export function showWaiting(turn, text) {
  turn.progress.replaceChildren(el("div", { class: "progress-item" }, el("div", { class: "row" }, el("progress", { "aria-label": text }), el("span", { class: "step", text }))));
}

/** The turn's pictures with their seed, size and time, and the request as curl and Python;
 * attach(picture, paint) makes a picture the next request's input. */
export function showAnswer(turn, attach) {
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
