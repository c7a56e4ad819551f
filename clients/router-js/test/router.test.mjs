// The Router with an injected fetch and clock: a failed read keeps the old view until it ages
// out into "hold"; a write failure forces a re-read; crossing answers keep the later read; the
// timer never keeps a process alive. No test depends on timing: time is the injected clock.
// Run: node --test clients/router-js/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { Router } from '../index.mjs';

const body = (percent, epoch, fenced = null) =>
  JSON.stringify({ services: [{ service: 'customers_db', percent, epoch, phase: 'stable', fenced, canFlip: false, canRollback: true, forwardLag: 0, reverseLag: null }] });
const answer = (status, text) => ({ status, text: async () => text });
const KEY = 'k-203'; // bucket 3 (see vectors.json)

/** A fake ficus: `next` is what the next read answers (a response, or an Error to throw). */
function fake() {
  const f = { next: answer(200, body(10, 4)), urls: [], clock: 0 };
  f.fetch = async (url) => {
    f.urls.push(url);
    if (f.next instanceof Error) throw f.next;
    return f.next;
  };
  f.router = new Router({ url: 'http://ficus:9464', instance: 'web-1', fetch: f.fetch, now: () => f.clock });
  return f;
}

test('a failed read keeps the old view, which then ages out into hold', async () => {
  const f = fake();
  assert.equal(f.router.route('customers_db', KEY).route, 'hold'); // nothing read yet
  assert.equal(await f.router.refresh(), true);
  assert.deepEqual(f.urls, ['http://ficus:9464/cutover?instance=web-1']);
  assert.equal(f.router.route('customers_db', KEY).route, 'service');

  for (const [bad, why] of [
    [answer(503, 'the cutover state has not been read yet\n'), /HTTP 503: the cutover state/],
    [answer(200, '<html>'), /not JSON/],
    [answer(200, '{"services":[{"service":"customers_db","percent":0,"epoch":5}]}'), /no "fenced"/],
    [new TypeError('fetch failed'), /fetch failed/],
  ]) {
    f.next = bad;
    f.clock += 1_000;
    assert.equal(await f.router.refresh(), false);
    assert.match(f.router.lastError.message, why);
    const d = f.router.route('customers_db', KEY); // still the view read at 0
    assert.deepEqual([d.route, d.epoch], ['service', 4]);
  }
  f.clock = 10_000; // exactly maxAge: still acted on
  assert.equal(f.router.route('customers_db', KEY).route, 'service');
  f.clock = 10_001;
  const held = f.router.route('customers_db', KEY);
  assert.equal(held.route, 'hold');
  assert.match(held.reason, /no fresh view/);

  f.next = answer(200, body(0, 5));
  assert.equal(await f.router.refresh(), true);
  assert.equal(f.router.lastError, null);
  assert.deepEqual([f.router.route('customers_db', KEY).route, f.router.view.services[0].epoch], ['monolith', 5]);
});

test('a fence holds until a view without it', async () => {
  const f = fake();
  f.next = answer(200, body(0, 5, { from: 0, to: 10, epoch: 5, losing: 'monolith' }));
  await f.router.refresh();
  assert.equal(f.router.route('customers_db', KEY).route, 'hold');
  f.next = answer(200, body(10, 6));
  await f.router.refresh();
  assert.deepEqual(f.router.route('customers_db', KEY), { route: 'service', bucket: 3, epoch: 6, reason: null });
});

test('writeFailed forces a re-read: decisions hold until a view read after it', async () => {
  // Reads answer when the test releases them, in order.
  const answers = [];
  const router = new Router({ url: 'http://f', instance: 'i', now: () => 0, fetch: () => new Promise((r) => answers.push(r)) });
  const first = router.refresh();
  answers[0](answer(200, body(10, 4)));
  assert.equal(await first, true);
  assert.equal(router.route('customers_db', KEY).route, 'service');

  const reread = router.writeFailed();
  const d = router.route('customers_db', KEY); // the view was read before the failure
  assert.deepEqual([d.route, d.epoch], ['hold', null]);
  assert.match(d.reason, /re-reading it after a failed write/);
  answers[1](answer(200, body(10, 4)));
  assert.equal(await reread, true);
  assert.equal(router.route('customers_db', KEY).route, 'service');

  // A re-read that fails leaves the decisions holding (never the monolith).
  const failed = router.writeFailed();
  answers[2](answer(503, ''));
  assert.equal(await failed, false);
  assert.equal(router.route('customers_db', KEY).route, 'hold');

  // A read sent before the failure that answers after it does not count as the re-read.
  const before = router.refresh();
  const again = router.writeFailed();
  answers[3](answer(200, body(10, 4)));
  assert.equal(await before, true);
  assert.equal(router.route('customers_db', KEY).route, 'hold');
  answers[4](answer(200, body(10, 4)));
  await again;
  assert.equal(router.route('customers_db', KEY).route, 'service');
});

test('of two answers that cross, the later read is kept', async () => {
  const pending = [];
  const router = new Router({ url: 'http://f', instance: 'i', now: () => 0, fetch: () => new Promise((r) => pending.push(r)) });
  const first = router.refresh();
  const second = router.refresh();
  pending[1](answer(200, body(50, 8))); // the later read answers first
  await second;
  pending[0](answer(200, body(10, 7)));
  await first;
  assert.equal(router.view.services[0].epoch, 8);
});

test('options are checked', () => {
  const fetch = async () => answer(200, body(0, 1));
  assert.throws(() => new Router({ instance: 'i', fetch }), /url/);
  assert.throws(() => new Router({ url: 'http://f', instance: '', fetch }), /instance/);
  assert.throws(() => new Router({ url: 'http://f', maxAgeMs: 0, fetch }), /maxAgeMs/);
  // A view must be re-read at least every maxAge.
  assert.throws(() => new Router({ url: 'http://f', maxAgeMs: 1000, refreshMs: 1000, fetch }), /refreshMs/);
  assert.match(new Router({ url: 'http://f', fetch }).url, /instance=.+%3A\d+$/); // host:pid by default
});

test('start() reads at once and on its timer; stop() ends it', async () => {
  let reads = 0;
  const router = new Router({ url: 'http://f', instance: 'i', refreshMs: 5, fetch: async () => (reads++, answer(200, body(10, reads))) });
  assert.equal(await router.start(), true);
  assert.ok(reads >= 1);
  // Wait (generously bounded) for the timer to have read again.
  const until = Date.now() + 10_000;
  while (reads < 3 && Date.now() < until) await new Promise((r) => setTimeout(r, 5));
  router.stop();
  assert.ok(reads >= 3, `the timer read ${reads} times in 10 s`);
  const after = reads;
  await new Promise((r) => setTimeout(r, 50));
  assert.ok(reads <= after + 1, 'no reads after stop (but one under way)');
});

test('a started router never keeps a process alive', async () => {
  const script = `
    import { Router } from ${JSON.stringify(new URL('../index.mjs', import.meta.url).href)};
    const r = new Router({ url: 'http://f', instance: 'i', refreshMs: 10, fetch: async () => ({ status: 503, text: async () => '' }) });
    await r.start();
    console.log('started');`;
  const { code, stdout } = await new Promise((resolve) => {
    const child = execFile(process.execPath, ['--input-type=module', '-e', script], { timeout: 30_000 }, (err, stdout) =>
      resolve({ code: err ? (err.killed ? 'killed' : err.code) : 0, stdout }),
    );
    child.stdin?.end();
  });
  assert.equal(stdout.trim(), 'started');
  assert.equal(code, 0, 'the process exited on its own');
});

test('whenWritable resolves once the fence lifts, and gives up with the reason', async () => {
  const f = fake();
  f.next = answer(200, body(10, 4, { from: 0, to: 50, epoch: 4 }));
  assert.equal(await f.router.refresh(), true);
  assert.equal(f.router.route('customers_db', KEY).route, 'hold');
  let reads = 0;
  const fetch = f.fetch;
  f.router = new Router({
    url: 'http://ficus:9464', instance: 'web-1', refreshMs: 5, now: () => f.clock,
    fetch: async (url) => { reads += 1; if (reads === 3) f.next = answer(200, body(50, 5)); return fetch(url); },
  });
  const d = await f.router.whenWritable('customers_db', KEY, { timeoutMs: 60_000 });
  assert.deepEqual([d.route, d.epoch], ['service', 5]);
  assert.ok(reads >= 3, `${reads} reads`);
  // Still fenced when the time is up: rejects, naming why.
  f.next = answer(200, body(50, 6, { from: 0, to: 10, epoch: 6 }));
  assert.equal(await f.router.refresh(), true);
  const stuck = f.router.whenWritable('customers_db', KEY, { timeoutMs: 100 });
  f.clock += 1_000; // the injected clock passes the deadline; maxAge is not reached
  await assert.rejects(stuck, /still held after 100 ms: fenced: buckets \[0, 10\)/);
  // A key that is not held resolves at once.
  f.next = answer(200, body(50, 7));
  await f.router.refresh();
  assert.equal((await f.router.whenWritable('customers_db', KEY)).route, 'service');
});
