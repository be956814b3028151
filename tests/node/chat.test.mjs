// Chat completions and RAG chat through the official openai SDK, on a server started
// with --chat_template=tests/chat_templates/chatml-bos.jinja.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { client, MODEL } from './common.mjs';

const messages = [
  { role: 'system', content: 'You tell stories.' },
  { role: 'user', content: 'Tell me about Lily.' },
];
const greedy = { model: MODEL, messages, max_tokens: 12, temperature: 0 };

test('chat completion', async () => {
  const r = await client.chat.completions.create(greedy);
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.choices[0].message.role, 'assistant');
  assert.equal(typeof r.choices[0].message.content, 'string');
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 12);
});

test('the rendered chat tokenizes "<s>" to BOS once', async () => {
  // chatml-bos.jinja starts with bos_token: the chat prompt is the completion of the same
  // text without "<s>" (which /v1/completions adds as BOS itself).
  const text = messages.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join('') +
    '<|im_start|>assistant\n';
  const chat = await client.chat.completions.create(greedy);
  const plain = await client.completions.create({
    model: MODEL, prompt: text, max_tokens: 12, temperature: 0,
  });
  assert.equal(chat.usage.prompt_tokens, plain.usage.prompt_tokens);
  assert.equal(chat.choices[0].message.content, plain.choices[0].text);
});

test('streamed chat completion', async () => {
  const full = await client.chat.completions.create(greedy);
  const stream = await client.chat.completions.create({
    ...greedy, stream: true, stream_options: { include_usage: true },
  });
  let text = '';
  let role = null;
  let usage = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      role = c.delta.role ?? role;
      text += c.delta.content ?? '';
    }
  }
  assert.equal(role, 'assistant');
  assert.equal(text, full.choices[0].message.content);
  assert.deepEqual(usage, full.usage);
});

test('chat logprobs', async () => {
  const r = await client.chat.completions.create({ ...greedy, logprobs: true, top_logprobs: 2 });
  const content = r.choices[0].logprobs.content;
  assert.equal(content.length, 12);
  for (const t of content) {
    assert.equal(typeof t.token, 'string');
    assert.ok(t.logprob <= 0);
    assert.ok(t.top_logprobs.length >= 1 && t.top_logprobs.length <= 2);
  }
});

test('RAG chat with documents reports every document', async () => {
  const r = await client.chat.completions.create({
    ...greedy,
    documents: [
      { id: 'lily', text: 'Lily was a girl who loved to play in the park.' },
      { id: 'tom', text: 'Tom had a red ball and a big dog.' },
      { id: 'sun', text: 'The sun was hot and the sky was blue.' },
    ],
    rag: { top_k: 1 },
  });
  assert.equal(typeof r.choices[0].message.content, 'string');
  const report = r.choices[0].rag;
  assert.equal(report.documents.length, 3);
  assert.deepEqual(report.documents.map((d) => d.id), ['lily', 'tom', 'sun']);
  assert.equal(report.documents.filter((d) => d.kept).length, 1);
  for (const d of report.documents) assert.ok(d.tokens > 0);
  // Again: the documents' KV comes from the path cache.
  const again = await client.chat.completions.create({ ...greedy, documents: [
    { id: 'lily', text: 'Lily was a girl who loved to play in the park.' },
    { id: 'tom', text: 'Tom had a red ball and a big dog.' },
    { id: 'sun', text: 'The sun was hot and the sky was blue.' },
  ], rag: { top_k: 1 } });
  assert.ok(again.choices[0].rag.documents.every((d) => d.cached));
  assert.equal(again.choices[0].message.content, r.choices[0].message.content);
});

test('a chat without a user message cannot take documents', async () => {
  await assert.rejects(client.chat.completions.create({
    ...greedy, messages: [{ role: 'system', content: 'x' }], documents: [{ text: 'd' }],
  }), (e) => e.status === 400 && e.param === 'messages');
});
