// Checks the JavaScript router against clients/vectors.json, written by an independent
// implementation (clients/gen_vectors.py): every key's bucket, every decision, and which
// bodies are a view. Run: node --test clients/router-js/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { bucket, decide, parseView, UnknownServiceError, DEFAULT_MAX_AGE_MS } from '../index.mjs';

const vectors = JSON.parse(readFileSync(new URL('../../vectors.json', import.meta.url), 'utf8'));

/** A stand-in for a MongoDB ObjectId: anything with toHexString(). */
const objectId = (hex) => ({ toHexString: () => hex });

/** The vector's key as the JavaScript values an application would pass (each must agree). */
function jsKeys({ kind, value }) {
  switch (kind) {
    case 'text':
      return [value];
    case 'objectid':
      return [objectId(value)];
    case 'int': {
      const big = BigInt(value);
      const n = Number(value);
      return Number.isSafeInteger(n) ? [big, n] : [big];
    }
  }
  throw new Error(`unknown kind ${kind}`);
}

test('the README worked examples', () => {
  assert.equal(bucket('U4af4980629c1e3f2b7d5a8e9c0f1d2e3'), 62);
  assert.equal(bucket(objectId('65a1b2c3d4e5f60718293a4b')), 11);
  assert.equal(bucket(42), 37);
  assert.equal(bucket(42n), 37);
});

test('every key vector has its bucket', () => {
  assert.ok(vectors.keys.length >= 200);
  for (const k of vectors.keys) {
    for (const key of jsKeys(k)) {
      assert.equal(bucket(key), k.bucket, `${k.kind} ${JSON.stringify(k.value)} (${typeof key})`);
    }
  }
});

test('every decision vector', () => {
  assert.equal(vectors.defaultMaxAgeMs, DEFAULT_MAX_AGE_MS);
  for (const d of vectors.decisions) {
    const readAt = d.view === null ? null : 1_000;
    const run = () => decide(d.view, readAt, 1_000 + d.ageMs, d.service, jsKeys(d.key)[0], d.maxAgeMs ?? DEFAULT_MAX_AGE_MS);
    if (d.expect === 'error') {
      assert.throws(run, UnknownServiceError, d.name);
      continue;
    }
    const got = run();
    assert.equal(got.route, d.expect, d.name);
    assert.equal(got.bucket, d.bucket, d.name);
    assert.equal(got.epoch, d.epoch, d.name);
    assert.equal(typeof got.reason, d.expect === 'hold' ? 'string' : 'object', d.name);
  }
});

test('bodies that are no view are refused, and views are taken', () => {
  for (const { name, body } of vectors.badViews) {
    assert.throws(() => parseView(body), { name: 'ViewError' }, name);
  }
  for (const { name, body } of vectors.goodViews) {
    assert.ok(Array.isArray(parseView(body).services), name);
  }
});
