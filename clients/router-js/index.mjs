// ficus-router: the application side of ficus's ownership contract. An application embeds it
// to tell, for each write, whether the key belongs to the service, to the monolith, or is held
// for now (a move under way, or no fresh view of who owns what). Read ficus's README
// ("What applications do") for the contract; clients/README.md for how to use this module.
//
// No runtime dependencies: node:crypto for SHA-256, the global fetch (Node >= 18) for the view.

import { createHash } from 'node:crypto';
import { hostname } from 'node:os';

/** The longest a view may be acted on (ficus's `cutover.view_max_age_secs`, 10 s by default). */
export const DEFAULT_MAX_AGE_MS = 10_000;

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

// ---------------------------------------------------------------------------------------------
// The routing function.

/**
 * The bucket (0..99) of a routing key already in its string form: SHA-256 of its UTF-8, the
 * digest's first 8 bytes as a big-endian unsigned 64-bit integer, modulo 100 (the contract).
 */
export function bucketOfString(text) {
  const digest = createHash('sha256').update(text, 'utf8').digest();
  return Number(digest.readBigUInt64BE(0) % 100n);
}

/**
 * The string form the contract hashes: text as it is, an ObjectId as its 24-character
 * lowercase hex, an integer in decimal. Anything else is refused, never guessed at (ficus
 * hashes other BSON types as Extended JSON, which a JavaScript value does not determine).
 */
export function keyString(key) {
  switch (typeof key) {
    case 'string':
      // A lone surrogate has no UTF-8 form: hashing it would hash U+FFFD instead.
      if (LONE_SURROGATE.test(key)) {
        throw new TypeError('ficus router: a string key holds a lone UTF-16 surrogate (not valid text)');
      }
      return key;
    case 'number':
      // Only integers can be written in decimal, and only safe ones are the integer meant.
      if (!Number.isSafeInteger(key)) {
        throw new TypeError(
          `ficus router: a number key must be a safe integer, got ${key} (pass a bigint for larger integers)`,
        );
      }
      return String(key); // -0 gives "0", as MongoDB's integers do
    case 'bigint':
      // MongoDB's integers are at most 64-bit: a larger one is no integer key of a document.
      if (key < I64_MIN || key > I64_MAX) {
        throw new RangeError(`ficus router: an integer key must fit in 64 bits (signed), got ${key}`);
      }
      return key.toString();
    case 'object':
      if (key !== null && typeof key.toHexString === 'function') {
        const hex = String(key.toHexString());
        if (!/^[0-9a-fA-F]{24}$/.test(hex)) {
          throw new TypeError(`ficus router: an ObjectId key's toHexString() must give 24 hex digits, got ${JSON.stringify(hex)}`);
        }
        return hex.toLowerCase();
      }
  }
  throw new TypeError(
    `ficus router: cannot route a key of type ${describe(key)}; ` +
      'a key is a string, a safe integer, a bigint, or an ObjectId (anything with toHexString())',
  );
}

/** The bucket (0..99) of a routing key: a string, a safe integer, a bigint or an ObjectId. */
export function bucket(key) {
  return bucketOfString(keyString(key));
}

function describe(value) {
  if (value === null) return 'null';
  if (typeof value !== 'object') return typeof value;
  const name = Object.getPrototypeOf(value)?.constructor?.name;
  return name ? `object (${name})` : 'object';
}

// ---------------------------------------------------------------------------------------------
// The view: what `GET <base>/cutover?instance=ID` answers.

/** The body was no view; the router keeps the view it had (which then ages out). */
export class ViewError extends Error {
  constructor(message, options) {
    super(`ficus router: the /cutover body is not a view: ${message}`, options);
    this.name = 'ViewError';
  }
}

/** A route asked for a service the view does not list. */
export class UnknownServiceError extends Error {
  constructor(service, known) {
    super(
      `ficus router: the view lists no service ${JSON.stringify(service)}` +
        ` (it lists ${known.length ? known.map((s) => JSON.stringify(s)).join(', ') : 'none'})`,
    );
    this.name = 'UnknownServiceError';
    this.service = service;
  }
}

const isBucketBound = (n) => Number.isInteger(n) && n >= 0 && n <= 100;

/**
 * Parses and checks a /cutover body. Unknown fields are ignored; the fields a decision uses
 * (service, percent, epoch, fenced) must be there and make sense, or the body is refused.
 */
export function parseView(body) {
  let parsed;
  try {
    parsed = JSON.parse(body);
  } catch (e) {
    throw new ViewError(`not JSON (${e.message})`, { cause: e });
  }
  if (parsed === null || typeof parsed !== 'object' || !Array.isArray(parsed.services)) {
    throw new ViewError('no "services" list');
  }
  const seen = new Set();
  parsed.services.forEach((s, i) => {
    const where = `services[${i}]`;
    if (s === null || typeof s !== 'object') throw new ViewError(`${where} is not an object`);
    if (typeof s.service !== 'string' || s.service === '') throw new ViewError(`${where}: no "service" name`);
    const at = `${where} (${s.service})`;
    if (seen.has(s.service)) throw new ViewError(`${at}: listed twice`);
    seen.add(s.service);
    if (!isBucketBound(s.percent)) throw new ViewError(`${at}: "percent" must be an integer 0..100, got ${JSON.stringify(s.percent)}`);
    if (!Number.isSafeInteger(s.epoch)) throw new ViewError(`${at}: "epoch" must be an integer, got ${JSON.stringify(s.epoch)}`);
    // The fence decides holds: a view that does not say whether there is one is not acted on.
    if (!('fenced' in s)) throw new ViewError(`${at}: no "fenced" (null when there is no fence)`);
    const f = s.fenced;
    if (f !== null) {
      const ok = typeof f === 'object' && isBucketBound(f.from) && isBucketBound(f.to) && f.from <= f.to;
      if (!ok || !Number.isSafeInteger(f.epoch)) {
        throw new ViewError(`${at}: "fenced" must be null or {from, to, epoch} with 0 <= from <= to <= 100, got ${JSON.stringify(f)}`);
      }
    }
  });
  return parsed;
}

/** The URL of ficus's view for an application instance: `<base>/cutover?instance=<ID>`. */
export function cutoverUrl(base, instance) {
  return `${String(base).replace(/\/+$/, '')}/cutover?instance=${encodeURIComponent(instance)}`;
}

// ---------------------------------------------------------------------------------------------
// Decisions.

function hold(bucket, epoch, reason) {
  return { route: 'hold', bucket, epoch, reason };
}

/**
 * Where a write to `key` of `service` goes, by a view read at `readAtMs` (null: none), at
 * `nowMs` (same clock). Pure. Returns `{ route: 'service' | 'monolith' | 'hold', bucket,
 * epoch, reason }` (`epoch`: the service's epoch in the view used, null when none was;
 * `reason`: why, for a hold; null otherwise). Throws a TypeError for a key it cannot route and
 * an UnknownServiceError for a service a fresh view does not list.
 */
export function decide(view, readAtMs, nowMs, service, key, maxAgeMs = DEFAULT_MAX_AGE_MS) {
  const b = bucket(key); // a bad key is an error whatever the view
  // Never act on a view older than maxAgeMs; with none that young, hold.
  if (view == null || readAtMs == null) return hold(b, null, 'no fresh view: none has been read yet');
  const age = nowMs - readAtMs;
  if (!(age <= maxAgeMs)) return hold(b, null, `no fresh view: the last one is ${age} ms old (at most ${maxAgeMs} ms)`);
  const s = view.services.find((x) => x.service === service);
  if (s === undefined) throw new UnknownServiceError(service, view.services.map((x) => x.service));
  // A fenced bucket [from, to) is being moved: hold its writes until a view shows no fence.
  const f = s.fenced;
  if (f != null && b >= f.from && b < f.to) {
    return hold(
      b,
      s.epoch,
      `fenced: buckets [${f.from}, ${f.to}) of ${service} are moving (epoch ${f.epoch}); queue the write or retry shortly`,
    );
  }
  // A service at P% owns the keys whose bucket is below P.
  return { route: b < s.percent ? 'service' : 'monolith', bucket: b, epoch: s.epoch, reason: null };
}

// ---------------------------------------------------------------------------------------------
// The router: keeps a view fresh and decides by it.

export class Router {
  #url;
  #maxAgeMs;
  #refreshMs;
  #fetch;
  #now;
  /** The view acted on: { view, readAtMs, request, failures }. */
  #current = null;
  /** Numbers each read, so that of two answers that cross, the later read's is kept. */
  #requests = 0;
  /** Write failures so far: a view read before the latest one is not acted on. */
  #failures = 0;
  #timer = null;
  #ticking = false;
  #inflight = new Set();
  #lastError = null;

  /**
   * @param {object} options
   * @param {string} options.url ficus's metrics address, e.g. `http://ficus:9464`
   * @param {string} [options.instance] a stable id of this process (default host:pid); ficus
   *   records the epoch each instance saw, which is how a fence knows it holds
   * @param {number} [options.maxAgeMs] never act on a view older than this (default 10 000)
   * @param {number} [options.refreshMs] how often `start()` re-reads (default maxAgeMs / 2)
   * @param {Function} [options.fetch] a fetch (default globalThis.fetch); it must resolve to
   *   something with `status` and `text()`
   * @param {Function} [options.now] a monotonic clock in ms (default performance.now)
   */
  constructor({
    url,
    instance = `${hostname()}:${process.pid}`,
    maxAgeMs = DEFAULT_MAX_AGE_MS,
    refreshMs = maxAgeMs / 2,
    fetch = globalThis.fetch,
    now = () => performance.now(),
  } = {}) {
    if (typeof url !== 'string' || url === '') throw new TypeError('ficus router: `url` (ficus\'s metrics address) is required');
    if (typeof instance !== 'string' || instance === '') throw new TypeError('ficus router: `instance` must be a non-empty string');
    if (!(maxAgeMs > 0 && Number.isFinite(maxAgeMs))) throw new RangeError(`ficus router: maxAgeMs must be a positive number, got ${maxAgeMs}`);
    // The view must be re-read at least every maxAge, or it ages out between two reads.
    if (!(refreshMs > 0 && refreshMs < maxAgeMs)) {
      throw new RangeError(`ficus router: refreshMs must be above 0 and below maxAgeMs (${maxAgeMs}), got ${refreshMs}`);
    }
    if (typeof fetch !== 'function') throw new TypeError('ficus router: no fetch: pass one, or use Node >= 18');
    this.#url = cutoverUrl(url, instance);
    this.#maxAgeMs = maxAgeMs;
    this.#refreshMs = refreshMs;
    this.#fetch = fetch;
    this.#now = now;
  }

  /** The URL read. */
  get url() {
    return this.#url;
  }

  /** The view decisions use (the parsed body), or null before the first good read. */
  get view() {
    return this.#current?.view ?? null;
  }

  /** Why the last read failed (null when it succeeded). */
  get lastError() {
    return this.#lastError;
  }

  /**
   * Reads the view once. Resolves true when it was taken, false when not (non-200, a body
   * that is no view, a network error, no answer within maxAgeMs: see `lastError`); never
   * rejects. A failed read keeps the old view, which ages out into "hold".
   */
  async refresh() {
    const request = ++this.#requests;
    const failures = this.#failures;
    // The view's age counts from when it was asked for: ficus answers with what its store says
    // at some moment after this, so the age is never underestimated.
    const readAtMs = this.#now();
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(new Error(`no answer within ${this.#maxAgeMs} ms`)), this.#maxAgeMs);
    timeout.unref?.();
    this.#inflight.add(abort);
    try {
      const res = await this.#fetch(this.#url, { signal: abort.signal, headers: { accept: 'application/json' } });
      const body = await res.text();
      // 503: ficus has not read its records yet. Any other non-200 is no view either.
      if (res.status !== 200) throw new Error(`GET ${this.#url}: HTTP ${res.status}: ${body.slice(0, 200).trim()}`);
      const view = parseView(body);
      if (this.#current === null || request > this.#current.request) {
        this.#current = { view, readAtMs, request, failures };
      }
      this.#lastError = null;
      return true;
    } catch (e) {
      this.#lastError = e;
      return false;
    } finally {
      clearTimeout(timeout);
      this.#inflight.delete(abort);
    }
  }

  /**
   * Reads the view now and then every refreshMs, on a timer that never keeps the process
   * alive. Resolves like `refresh()` once the first read is done.
   */
  start() {
    if (this.#timer === null) {
      this.#timer = setInterval(() => this.#tick(), this.#refreshMs);
      this.#timer.unref?.();
    }
    return this.refresh();
  }

  /** Stops the timer and abandons reads under way. */
  stop() {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
    for (const abort of this.#inflight) abort.abort(new Error('router stopped'));
  }

  #tick() {
    if (this.#ticking) return; // one timed read at a time: a slow ficus is not piled on
    this.#ticking = true;
    this.refresh().finally(() => {
      this.#ticking = false;
    });
  }

  /**
   * Where a write to `key` of `service` goes now: see `decide`. Holds while the view is older
   * than maxAgeMs, or was read before the last `writeFailed()`.
   */
  route(service, key) {
    const cur = this.#current;
    if (cur !== null && cur.failures < this.#failures) {
      return hold(bucket(key), null, 'no fresh view: re-reading it after a failed write');
    }
    return decide(cur?.view ?? null, cur?.readAtMs ?? null, this.#now(), service, key, this.#maxAgeMs);
  }

  /**
   * Resolves with the decision for a write to `key` of `service` once it is not held (the
   * fence lifted, a fresh view read), re-reading the view every refreshMs meanwhile. Rejects
   * after `timeoutMs` (default 5 minutes) with the last hold's reason, or when `signal`
   * aborts. A key that is not held resolves at once.
   */
  async whenWritable(service, key, { timeoutMs = 300_000, signal } = {}) {
    const deadline = this.#now() + timeoutMs;
    for (;;) {
      signal?.throwIfAborted();
      const d = this.route(service, key);
      if (d.route !== 'hold') return d;
      if (this.#now() >= deadline) {
        throw new Error(`ficus router: a write to ${service} key bucket ${d.bucket} is still held after ${timeoutMs} ms: ${d.reason}`);
      }
      await this.refresh();
      const again = this.route(service, key);
      if (again.route !== 'hold') return again;
      await new Promise((resolve) => {
        const t = setTimeout(resolve, Math.min(this.#refreshMs, Math.max(0, deadline - this.#now())));
        signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
      });
    }
  }

  /**
   * Call when a write to the service failed. It only forces a re-read of the view: decisions
   * hold until a view read after this call arrives. It never sends the write to the monolith:
   * retry the service (route again once this resolves) or fail the request. Resolves like
   * `refresh()`.
   */
  writeFailed() {
    this.#failures += 1;
    return this.refresh();
  }
}
