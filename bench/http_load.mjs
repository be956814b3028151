// HTTP load client for the OpenAI-compatible API (bench/http_vs_grpc.sh): `streams`
// concurrent streams, each sending `requests` streamed /v1/completions back to back
// (random token-id prompts, EOS ignored, greedy), like superpose-load does over gRPC.
// Prints aggregate generated tokens/s, mean time to first token and mean inter-token
// latency (per SSE chunk carrying text).
// Usage: node bench/http_load.mjs PORT MODEL [streams=16] [requests=4] [prompt=16] [new=64] [vocab=256]
const [port, model, streams = 16, requests = 4, promptTokens = 16, newTokens = 64, vocab = 256] =
  process.argv.slice(2).map((v, i) => (i < 2 ? v : Number(v)));

let seed = 99;
const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;

async function one() {
  const prompt = Array.from({ length: promptTokens }, () => Math.floor(rand() * vocab));
  const start = performance.now();
  const res = await fetch(`http://127.0.0.1:${port}/v1/completions`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ model, prompt, max_tokens: newTokens, temperature: 0,
      ignore_eos: true, stream: true, stream_options: { include_usage: true } }),
  });
  if (res.status !== 200) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  const decoder = new TextDecoder();
  let buf = '', first = 0, last = 0, gaps = 0, gapSum = 0, tokens = 0;
  for await (const part of res.body) {
    buf += decoder.decode(part, { stream: true });
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      if (!event.startsWith('data: {')) continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      // Every choice chunk: the first one is sent at the first token even when its text
      // is held back, the last carries finish_reason.
      if (!chunk.choices.length) continue;
      const now = performance.now();
      if (!first) first = now - start; else { gaps++; gapSum += now - last; }
      last = now;
    }
  }
  // TPOT as superpose-load reports it: (last token - first token) / (tokens - 1). Chunk
  // gaps are not per token: a token whose text is held back (an incomplete UTF-8
  // character, a possible stop string) sends no chunk of its own; the first and the
  // last chunk are always sent.
  const tpot = tokens > 1 ? (last - start - first) / (tokens - 1) : 0;
  return { tokens, ttft: first, gaps, gapSum, tpot };
}

const t0 = performance.now();
const results = (await Promise.all(Array.from({ length: streams }, async () => {
  const out = [];
  for (let i = 0; i < requests; i++) out.push(await one());
  return out;
}))).flat();
const seconds = (performance.now() - t0) / 1000;
const tokens = results.reduce((a, r) => a + r.tokens, 0);
const ttft = results.reduce((a, r) => a + r.ttft, 0) / results.length;
const tpot = results.reduce((a, r) => a + r.tpot, 0) / results.length;
console.log(`| http | ${streams} | ${tokens} | ${(tokens / seconds).toFixed(1)} | ${ttft.toFixed(1)} | ${tpot.toFixed(2)} |`);
