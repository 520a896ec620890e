// "Copy as curl" and "Copy as Python (openai)": the exact request a turn sent, for a terminal or a
// script. The key is never written into them: they read it from $KILN_API_KEY.

// The openai client's own arguments; everything else Kiln reads goes in extra_body.
const CHAT_ARGS = new Set(["model", "messages", "n", "seed", "stream", "stream_options", "temperature", "max_tokens", "max_completion_tokens", "user"]);
const EDIT_ARGS = new Set(["model", "prompt", "n", "size", "response_format", "user"]);

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

/** A JSON value as a Python literal (JSON strings are valid Python string literals). */
export function pythonLiteral(value, indent = 0) {
  const pad = " ".repeat(indent + 4);
  const end = " ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return "[\n" + value.map((v) => pad + pythonLiteral(v, indent + 4) + ",\n").join("") + end + "]";
  }
  const keys = Object.keys(value);
  if (keys.length === 0) return "{}";
  return "{\n" + keys.map((k) => `${pad}${JSON.stringify(k)}: ${pythonLiteral(value[k], indent + 4)},\n`).join("") + end + "}";
}

function split(body, own) {
  const args = {};
  const extra = {};
  for (const [k, v] of Object.entries(body)) (own.has(k) ? args : extra)[k] = v;
  return [args, extra];
}

function keywordArgs(args, extra) {
  const lines = Object.entries(args).map(([k, v]) => `    ${k}=${pythonLiteral(v, 4)},`);
  if (Object.keys(extra).length) lines.push(`    extra_body=${pythonLiteral(extra, 4)},`);
  return lines.join("\n");
}

/** request: {route: "chat", body} or {route: "edit", fields, files: {image, mask?}} */
export function curl(origin, request) {
  if (request.route === "chat") {
    return [
      `curl --no-buffer ${origin}/v1/chat/completions \\`,
      `  -H "Authorization: Bearer $KILN_API_KEY" -H "Content-Type: application/json" \\`,
      `  -d ${shellQuote(JSON.stringify(request.body))}`,
    ].join("\n");
  }
  const lines = [
    `# image.png: the picture (its download link); mask.png: the painted mask (its download link)`,
    `curl ${origin}/v1/images/edits -H "Authorization: Bearer $KILN_API_KEY" \\`,
    `  -F image=@image.png \\`,
  ];
  if (request.files.mask) lines.push(`  -F mask=@mask.png \\`);
  const fields = Object.entries(request.fields).map(([k, v]) => `  -F ${shellQuote(`${k}=${v}`)}`);
  return lines.concat(fields.join(" \\\n")).join("\n");
}

export function python(origin, request) {
  const head = [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(origin + "/v1")}, api_key=os.environ["KILN_API_KEY"])`,
  ];
  if (request.route === "chat") {
    const [args, extra] = split(request.body, CHAT_ARGS);
    const streaming = args.stream;
    return head
      .concat([
        `${streaming ? "stream" : "answer"} = client.chat.completions.create(`,
        keywordArgs(args, extra),
        ")",
        ...(streaming
          ? [
              "for chunk in stream:  # progress chunks carry chunk.progress; image parts arrive in delta.content",
              "    if chunk.choices and chunk.choices[0].delta.content:",
              "        print(chunk.choices[0].delta.content)",
            ]
          : ["print(answer.choices[0].message.content)"]),
      ])
      .join("\n");
  }
  const fields = { ...request.fields };
  const [args, extra] = split(fields, EDIT_ARGS);
  const files = ['    image=open("image.png", "rb"),'];
  if (request.files.mask) files.push('    mask=open("mask.png", "rb"),');
  return head
    .concat([
      "# image.png: the picture (its download link); mask.png: the painted mask (its download link)",
      "edited = client.images.edit(",
      ...files,
      keywordArgs(args, extra),
      ")",
      "print([image.url for image in edited.data])",
    ])
    .join("\n");
}
