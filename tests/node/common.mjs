// Shared by the suites: a client of the server run.sh started, and its metrics.
import OpenAI from 'openai';

export const MODEL = 'stories260k';
const port = process.env.SUPERPOSE_HTTP_PORT;
const metricsPort = process.env.SUPERPOSE_METRICS_PORT;
if (!port) throw new Error('SUPERPOSE_HTTP_PORT is not set: run tests/node/run.sh');

// No retries: a 429 or 503 must reach the test as it is.
export const client = new OpenAI({
  baseURL: `http://127.0.0.1:${port}/v1`,
  apiKey: 'unused',
  maxRetries: 0,
  timeout: 60000,
});

// The value of an unlabelled (or fully labelled) metric line, or 0.
export async function metric(name) {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  for (const line of text.split('\n')) {
    if (line.startsWith(name + ' ')) return Number(line.slice(name.length + 1));
  }
  return 0;
}

export async function waitFor(predicate, ms = 10000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await predicate()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}
