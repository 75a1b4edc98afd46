// The walkthrough with the npm client. LLM_URL and LLM_TOKEN point at a running server.
import { test } from "node:test";
import assert from "node:assert/strict";
import { InferenceClient } from "@huggingface/inference";
// The 2.x client the Inference Endpoints walkthrough was written with: it refuses any SSE content type but
// exactly `text/event-stream` (2.6.1 is the last release that compares it exactly).
import { HfInferenceEndpoint } from "hf-inference-v2";

const url = process.env.LLM_URL;
const token = process.env.LLM_TOKEN;
const endpoint = new InferenceClient(token).endpoint(url);
const parameters = { max_new_tokens: 12, top_k: 30, top_p: 0.9, temperature: 0.2, repetition_penalty: 1.02, stop: ["\nUser:"] };

test("textGenerationStream yields tokens", async () => {
  let text = "";
  let chunks = 0;
  for await (const chunk of endpoint.textGenerationStream({ inputs: "Once upon a time,", parameters })) {
    chunks += 1;
    // Current releases yield OpenAI completion chunks; older ones TGI stream events.
    text += chunk.choices?.[0]?.text ?? (chunk.token?.special ? "" : chunk.token?.text ?? "");
  }
  assert.ok(chunks > 0 && chunks <= 12);
  assert.ok(text.length > 0);
});

test("textGeneration answers", async () => {
  const out = await endpoint.textGeneration({ inputs: "Once upon a time,", parameters });
  assert.equal(typeof out.generated_text, "string");
  assert.ok(out.generated_text.length > 0);
});

test("chatCompletion, plain and streamed, agree when greedy", async () => {
  const args = { model: "tgi", messages: [{ role: "user", content: "Say hello" }], max_tokens: 8, temperature: 0 };
  const done = await endpoint.chatCompletion(args);
  let streamed = "";
  for await (const chunk of endpoint.chatCompletionStream(args)) {
    streamed += chunk.choices?.[0]?.delta?.content ?? "";
  }
  assert.equal(streamed, done.choices[0].message.content);
});

test("a missing token is refused", async () => {
  const anonymous = new InferenceClient().endpoint(url);
  await assert.rejects(anonymous.textGeneration({ inputs: "hi", parameters: { max_new_tokens: 2 } }));
});

test("the 2.x HfInferenceEndpoint streams and answers", async () => {
  const old = new HfInferenceEndpoint(url, token);
  let text = "";
  let last;
  let events = 0;
  for await (const event of old.textGenerationStream({ inputs: "Once upon a time,", parameters })) {
    events += 1;
    last = event;
    text += event.token.special ? "" : event.token.text;
  }
  assert.ok(events > 0 && events <= 12);
  // POST / (compat) returns the full text by default, as TGI does for text-generation models
  assert.ok(last.generated_text.startsWith("Once upon a time,") && last.generated_text.endsWith(text));
  const out = await old.textGeneration({ inputs: "Once upon a time,", parameters: { max_new_tokens: 4 } });
  assert.equal(typeof out.generated_text, "string");
});
