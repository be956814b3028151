// Renders every (template, input) of tests/chat_templates/corpus.json with
// @huggingface/jinja, the reference for our C++ interpreter (tests/chat_template_test.cc).
// Usage: node render_reference.mjs <corpus dir> <shared dir> <output.json>
// The context of a render is the input's extra_context plus messages,
// add_generation_prompt, bos_token and eos_token, as ChatTemplate::Render builds it.
// strftime_now() sees a fixed clock, 2026-02-03T04:05:06Z, formatted in UTC, en-US.
import fs from "node:fs";
import path from "node:path";
import { Template } from "@huggingface/jinja";

export const FIXED_NOW_MS = Date.UTC(2026, 1, 3, 4, 5, 6);

const RealDate = Date;
globalThis.Date = class extends RealDate {
  constructor(...args) {
    super(...(args.length ? args : [FIXED_NOW_MS]));
  }
  static now() {
    return FIXED_NOW_MS;
  }
};
const RealFormat = Intl.DateTimeFormat;
Intl.DateTimeFormat = function (locale, options) {
  return new RealFormat("en-US", { ...options, timeZone: "UTC" });
};
process.env.TZ = "UTC";

function templateSource(entry, corpusDir, sharedDir) {
  if (entry.tokenizer_config) {
    const file = path.join(sharedDir, "fixtures/tokenizers", entry.tokenizer_config, "tokenizer_config.json");
    const config = JSON.parse(fs.readFileSync(file, "utf8"));
    const token = (t) => (t == null ? "" : typeof t === "string" ? t : t.content);
    let source = config.chat_template;
    if (Array.isArray(source)) source = source.find((t) => t.name === "default").template;
    return { source, bos: token(config.bos_token), eos: token(config.eos_token) };
  }
  const source = entry.source ?? fs.readFileSync(path.join(corpusDir, entry.file), "utf8");
  return { source, bos: entry.bos_token, eos: entry.eos_token };
}

function renderOne(template, input, bos, eos) {
  const context = {
    ...(input.extra_context ?? {}),
    messages: input.messages,
    add_generation_prompt: input.add_generation_prompt,
    bos_token: bos,
    eos_token: eos,
  };
  try {
    return { ok: true, output: template.render(context) };
  } catch (e) {
    return { ok: false, error: String(e?.message ?? e) };
  }
}

const [corpusDir, sharedDir, outFile] = process.argv.slice(2);
if (!outFile) {
  console.error("usage: node render_reference.mjs <corpus dir> <shared dir> <output.json>");
  process.exit(2);
}
const corpus = JSON.parse(fs.readFileSync(path.join(corpusDir, "corpus.json"), "utf8"));
const cases = [];
for (const entry of corpus.templates) {
  const { source, bos, eos } = templateSource(entry, corpusDir, sharedDir);
  let template;
  try {
    template = new Template(source);
  } catch (e) {
    cases.push({ template: entry.name, input: null, ok: false, parse_error: String(e?.message ?? e) });
    continue;
  }
  const inputs = { ...corpus.inputs, ...(entry.inputs ?? {}) };
  for (const [name, input] of Object.entries(inputs)) {
    cases.push({ template: entry.name, input: name, ...renderOne(template, input, bos, eos) });
  }
}
fs.writeFileSync(outFile, JSON.stringify({ now_ms: FIXED_NOW_MS, cases }, null, 1));
const ok = cases.filter((c) => c.ok).length;
console.log(`render_reference: ${cases.length} renders, ${ok} ok, ${cases.length - ok} errors`);
