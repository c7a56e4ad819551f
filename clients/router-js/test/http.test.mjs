// The Router against a real HTTP server (node:http) serving a changing /cutover body, as ficus
// does: it passes instance= in the query, follows the changes, and takes a 503 as no view.
// Run: node --test clients/router-js/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { Router } from '../index.mjs';

const state = (percent, epoch, fenced = null) => ({
  services: [{ service: 'customers_db', percent, epoch, phase: fenced ? 'drain' : 'stable', fenced, canFlip: false, canRollback: true, forwardLag: 0, reverseLag: 0 }],
});

test('the router follows a real /cutover endpoint', async (t) => {
  let current = null; // null: ficus has not read its records yet (503)
  const seen = [];
  const server = createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    seen.push({ path: url.pathname, instance: url.searchParams.get('instance') });
    if (url.pathname !== '/cutover') return res.writeHead(404).end();
    if (current === null) return res.writeHead(503, { 'content-type': 'text/plain' }).end('the cutover state has not been read yet\n');
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(current));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => new Promise((r) => server.close(r)));
  const base = `http://127.0.0.1:${server.address().port}`;

  const router = new Router({ url: `${base}/`, instance: 'web-1:4242 a/b', refreshMs: 10 });
  t.after(() => router.stop());
  const key = 'k-203'; // bucket 3

  assert.equal(await router.refresh(), false);
  assert.match(router.lastError.message, /HTTP 503/);
  assert.equal(router.route('customers_db', key).route, 'hold');
  assert.deepEqual(seen[0], { path: '/cutover', instance: 'web-1:4242 a/b' });

  current = state(0, 1);
  assert.equal(await router.start(), true);
  assert.deepEqual(router.route('customers_db', key), { route: 'monolith', bucket: 3, epoch: 1, reason: null });

  // The timer follows a fence, then the flip; wait for each (bounded generously, no timing bet).
  const until = async (epoch) => {
    const deadline = Date.now() + 10_000;
    while (router.view?.services[0].epoch !== epoch && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.equal(router.view?.services[0].epoch, epoch, `the router did not read epoch ${epoch} within 10 s`);
  };
  current = state(0, 2, { from: 0, to: 10, epoch: 2, losing: 'monolith' });
  await until(2);
  assert.equal(router.route('customers_db', key).route, 'hold');
  current = state(10, 3);
  await until(3);
  assert.deepEqual(router.route('customers_db', key), { route: 'service', bucket: 3, epoch: 3, reason: null });
  assert.ok(seen.every((s) => s.instance === 'web-1:4242 a/b'));
});
