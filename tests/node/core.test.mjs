// The HTTP API through the official openai SDK: everything but chat (chat.test.mjs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { client, metric, waitFor, MODEL } from './common.mjs';

const greedy = { model: MODEL, prompt: 'Once upon a time', max_tokens: 16, temperature: 0 };

test('models.list names the served model', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.deepEqual(ids, [MODEL]);
  const one = await client.models.retrieve(MODEL);
  assert.equal(one.id, MODEL);
});

test('completion', async () => {
  const r = await client.completions.create(greedy);
  assert.equal(r.object, 'text_completion');
  assert.equal(r.choices.length, 1);
  assert.ok(r.choices[0].text.length > 0);
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 16);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + 16);
});

test('streamed completion equals the non-streamed one, with usage', async () => {
  const full = await client.completions.create(greedy);
  const stream = await client.completions.create({
    ...greedy, stream: true, stream_options: { include_usage: true },
  });
  let text = '';
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      text += c.text;
      finish = c.finish_reason ?? finish;
    }
  }
  assert.equal(text, full.choices[0].text);
  assert.equal(finish, 'length');
  assert.deepEqual(usage, full.usage);
});

test('stop ends the text before the stop string', async () => {
  const full = (await client.completions.create(greedy)).choices[0].text;
  const stop = full.slice(6, 10);
  const r = await client.completions.create({ ...greedy, stop: [stop] });
  assert.equal(r.choices[0].finish_reason, 'stop');
  assert.equal(r.choices[0].text, full.slice(0, full.indexOf(stop)));
});

test('the same seed gives the same text; n choices', async () => {
  const req = { model: MODEL, prompt: 'Lily', max_tokens: 12, temperature: 1, seed: 1234, n: 3 };
  const a = await client.completions.create(req);
  const b = await client.completions.create(req);
  assert.equal(a.choices.length, 3);
  assert.deepEqual(a.choices.map((c) => c.index), [0, 1, 2]);
  assert.deepEqual(a.choices.map((c) => c.text), b.choices.map((c) => c.text));
  assert.equal(a.usage.completion_tokens, 36);
  const others = await Promise.all([1, 2, 3].map((s) =>
    client.completions.create({ ...req, n: 1, seed: 1234 + 100 * s })));
  assert.ok(others.some((o) => o.choices[0].text !== a.choices[0].text), 'seeds differ');
});

test('logprobs', async () => {
  const r = await client.completions.create({ ...greedy, max_tokens: 6, logprobs: 3 });
  const lp = r.choices[0].logprobs;
  assert.equal(lp.tokens.length, 6);
  assert.equal(lp.tokens.join(''), r.choices[0].text);
  for (let i = 0; i < 6; i++) {
    assert.ok(lp.token_logprobs[i] <= 0);
    const top = Object.values(lp.top_logprobs[i]);
    assert.ok(top.length >= 1 && top.length <= 3);
    // Greedy: the chosen token is the most likely one.
    assert.ok(Math.max(...top) <= lp.token_logprobs[i] + 1e-5);
  }
});

test('errors: unknown model 404, bad field 400 naming it', async () => {
  await assert.rejects(client.completions.create({ ...greedy, model: 'gpt-4o' }), (e) => {
    assert.ok(e instanceof OpenAI.NotFoundError);
    assert.equal(e.status, 404);
    assert.equal(e.param, 'model');
    assert.equal(e.code, 'model_not_found');
    return true;
  });
  await assert.rejects(client.completions.create({ ...greedy, temperature: -1 }), (e) => {
    assert.ok(e instanceof OpenAI.BadRequestError);
    assert.equal(e.param, 'temperature');
    assert.equal(e.type, 'invalid_request_error');
    return true;
  });
  await assert.rejects(client.completions.create({ ...greedy, max_tokens: 100000 }), (e) => {
    assert.equal(e.status, 400);
    assert.equal(e.param, 'max_tokens');
    return true;
  });
});

test('a client that disconnects is cancelled and its KV freed', async () => {
  const cancelled = 'superpose_requests_finished_total{reason="cancelled"}';
  const before = await metric(cancelled);
  const controller = new AbortController();
  const stream = await client.completions.create(
    { model: MODEL, prompt: 'Once', max_tokens: 500, n: 16, ignore_eos: true, stream: true },
    { signal: controller.signal });
  try {
    for await (const chunk of stream) {
      assert.ok(chunk.choices.length >= 0);
      controller.abort();
    }
  } catch (e) {
    assert.ok(e instanceof OpenAI.APIUserAbortError || e.name === 'AbortError', String(e));
  }
  assert.ok(await waitFor(async () =>
    (await metric('superpose_kv_blocks_used')) === 0 && (await metric(cancelled)) > before),
  'KV freed and the request cancelled');
});
