// The decision rules one by one (fenced, hold, stale, unknown service) and the keys the router
// refuses, with the reasons an operator would read. Run: node --test clients/router-js/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { bucket, decide, cutoverUrl, UnknownServiceError } from '../index.mjs';

const view = {
  services: [
    { service: 'customers_db', percent: 10, epoch: 4, fenced: null },
    { service: 'conversations_db', percent: 10, epoch: 3, moving: [10, 50], fenced: { from: 10, to: 50, epoch: 3, losing: 'monolith' } },
  ],
};
const oid = { toHexString: () => '65a1b2c3d4e5f60718293a4b' }; // bucket 11

test('a fenced key is held, with the fence in the reason', () => {
  const d = decide(view, 0, 0, 'conversations_db', oid);
  assert.deepEqual({ ...d, reason: undefined }, { route: 'hold', bucket: 11, epoch: 3, reason: undefined });
  assert.match(d.reason, /^fenced: buckets \[10, 50\) of conversations_db are moving \(epoch 3\)/);
  // The same key outside any fence goes by the share: bucket 11 is not below 10.
  assert.equal(decide(view, 0, 0, 'customers_db', oid).route, 'monolith');
});

test('no view, or one older than maxAgeMs, holds', () => {
  const none = decide(null, null, 5, 'customers_db', 'x');
  assert.equal(none.route, 'hold');
  assert.equal(none.epoch, null);
  assert.match(none.reason, /^no fresh view/);
  assert.equal(decide(view, 0, 10_000, 'customers_db', oid).route, 'monolith');
  const stale = decide(view, 0, 10_001, 'customers_db', oid);
  assert.equal(stale.route, 'hold');
  assert.match(stale.reason, /10001 ms old \(at most 10000 ms\)/);
  assert.equal(decide(view, 0, 501, 'customers_db', oid, 500).route, 'hold');
  assert.equal(decide(view, 0, Number.NaN, 'customers_db', oid).route, 'hold');
});

test('an unknown service is an error naming it and the known ones', () => {
  assert.throws(() => decide(view, 0, 0, 'orders_db', 'x'), (e) => {
    assert.ok(e instanceof UnknownServiceError);
    assert.equal(e.service, 'orders_db');
    assert.match(e.message, /"orders_db".*"customers_db", "conversations_db"/);
    return true;
  });
});

test('keys of other types are refused, naming the type', () => {
  const cases = [
    [null, /type null/],
    [undefined, /type undefined/],
    [true, /type boolean/],
    [Symbol('k'), /type symbol/],
    [{ id: 1 }, /type object \(Object\)/],
    [new Date(0), /type object \(Date\)/],
    [Buffer.from('ab'), /type object \(Buffer\)/],
    [1.5, /safe integer, got 1.5/],
    [Number.NaN, /safe integer, got NaN/],
    [2 ** 53 + 2, /safe integer/],
    [2n ** 63n, /64 bits/],
    [-(2n ** 63n) - 1n, /64 bits/],
    [{ toHexString: () => '65a1b2c3' }, /24 hex digits/],
    [{ toHexString: () => 'zz'.repeat(12) }, /24 hex digits/],
    ['a\uD800b', /lone UTF-16 surrogate/],
  ];
  for (const [key, message] of cases) {
    assert.throws(() => bucket(key), message, String(typeof key === 'symbol' ? 'symbol' : key));
    // A bad key is an error even when there is no view to route by.
    assert.throws(() => decide(null, null, 0, 'customers_db', key), message);
  }
  // Edges that are fine: -0 is 0, i64's ends, an upper-case ObjectId (lowercased).
  assert.equal(bucket(-0), bucket(0));
  assert.equal(bucket(-(2n ** 63n)), bucket('-9223372036854775808'));
  assert.equal(bucket({ toHexString: () => '65A1B2C3D4E5F60718293A4B' }), 11);
});

test('the view URL names the instance, encoded', () => {
  assert.equal(cutoverUrl('http://ficus:9464/', 'pod a/b?&'), 'http://ficus:9464/cutover?instance=pod%20a%2Fb%3F%26');
  assert.equal(cutoverUrl('http://ficus:9464', 'h:1'), 'http://ficus:9464/cutover?instance=h%3A1');
});
