// The public API as any client sees it: fetch with a bearer key, OpenAI error bodies, and the
// Server-Sent Events of `stream: true` (README, "Streaming"). No state lives here.

export const STALL_MS = 30000; // the server sends a keep-alive every 10 s: silence this long is a dead connection
export const PLAIN_TIMEOUT_MS = 15 * 60 * 1000; // a non-streaming call (edits) that never answers

/** An error the API answered ({"error": {message, type, param, code}}), or one of the connection. */
export class ApiError extends Error {
  constructor({ status = 0, message, type = null, param = null, code = null, retryAfter = null }) {
    super(message);
    this.status = status; // 0: no HTTP answer (network), or an error sent inside a started stream
    this.type = type;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, from Retry-After
  }
}

export class ConnectionError extends ApiError {}

// In-band stream errors carry no HTTP status: recover it from the error code (README, "Errors").
const STATUS_OF_CODE = { queue_full: 429, service_unavailable: 503, timeout: 504, invalid_value: 400, invalid_type: 400 };

function retryAfterSeconds(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.round(seconds));
  const when = Date.parse(value); // the HTTP-date form
  return Number.isNaN(when) ? null : Math.max(0, Math.round((when - Date.now()) / 1000));
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say; the status still says what happened
  }
  const e = (body && body.error) || {};
  return new ApiError({
    status: response.status,
    message: e.message || response.statusText || `HTTP ${response.status}`,
    type: e.type || null,
    param: e.param ?? null,
    code: e.code ?? null,
    retryAfter: retryAfterSeconds(response.headers.get("retry-after")),
  });
}

export function inBandError(error) {
  return new ApiError({
    status: STATUS_OF_CODE[error.code] || 500,
    message: error.message || "the server reported an error",
    type: error.type || null,
    param: error.param ?? null,
    code: error.code ?? null,
  });
}

/** fetch() that answers a Response only when it is 2xx; otherwise throws ApiError. */
export async function call(path, { key, method = "GET", json, form, signal } = {}) {
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, cache: "no-store", credentials: "omit" });
  } catch (e) {
    if (signal && signal.aborted) throw signal.reason ?? e;
    throw new ConnectionError({ message: "could not reach the server: the connection failed or was dropped" });
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** The parsed `data:` payloads of an SSE response, up to `[DONE]`. Throws ConnectionError when the
 * stream ends without `[DONE]` or stays silent for STALL_MS. */
export async function* sseData(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await readOrStall(reader, signal);
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // a keep-alive comment
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  throw new ConnectionError({ message: "the connection closed before the answer was complete" });
}

async function readOrStall(reader, signal) {
  let timer;
  const stalled = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new ConnectionError({ message: `the server sent nothing for ${STALL_MS / 1000} s: the connection looks dead` })),
      STALL_MS,
    );
  });
  try {
    return await Promise.race([reader.read(), stalled]);
  } catch (e) {
    if (signal && signal.aborted) throw signal.reason ?? e;
    if (e instanceof ApiError) throw e;
    throw new ConnectionError({ message: "the connection to the server was lost during the answer" });
  } finally {
    clearTimeout(timer);
  }
}

/** A data: URL's bytes as a Blob (fetch() of a data: URL is outside this page's CSP). */
export function dataUrlBlob(url) {
  const [head, payload] = url.split(",", 2);
  const type = (head.match(/^data:([^;,]+)/) || [])[1] || "application/octet-stream";
  if (!/;base64$/.test(head)) return new Blob([decodeURIComponent(payload)], { type });
  const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

/** The bytes of a picture shown on the page: a data: URL, or a URL of this server (hosted images are open). */
export async function pictureBlob(url, signal) {
  if (url.startsWith("data:")) return dataUrlBlob(url);
  const response = await call(url, { signal });
  return response.blob();
}
