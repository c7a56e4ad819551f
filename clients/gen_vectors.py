#!/usr/bin/env python3
"""Writes clients/vectors.json: test vectors for the routers in clients/, computed by an
implementation of ficus's ownership contract that shares no code with them (Python's hashlib,
rules written again from the README), so that the JavaScript and Rust routers are checked
against something other than themselves.

Run from anywhere: python3 clients/gen_vectors.py   (deterministic: same output every run)

The contract (ficus README, "Cutover and reverse sync" / "What applications do"):
  bucket(key) = first 8 bytes of SHA-256(UTF-8 of the key's string form), big-endian u64, mod 100
  string form: text as it is, an ObjectId as its 24-character lowercase hex, an integer in decimal
  a service at P% owns the buckets below P; fenced buckets [from, to) are held; a view older
  than maxAgeMs is never acted on (hold); an unknown service is an error.
"""

import hashlib
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MAX_AGE_MS = 10_000


def bucket(text: str) -> int:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def string_form(kind: str, value: str) -> str:
    if kind == "text":
        return value
    if kind == "objectid":
        assert len(value) == 24 and all(c in "0123456789abcdefABCDEF" for c in value), value
        return value.lower()
    if kind == "int":
        n = int(value)
        assert -(2**63) <= n < 2**63, value
        return str(n)
    raise ValueError(kind)


def key(kind: str, value) -> dict:
    value = str(value)
    return {"kind": kind, "value": value, "bucket": bucket(string_form(kind, value))}


# The README's worked examples: checked here too, so a wrong generator cannot go unnoticed.
assert hashlib.sha256(b"U4af4980629c1e3f2b7d5a8e9c0f1d2e3").digest()[:8].hex() == "3bb46d8ed20b3382"
assert bucket("U4af4980629c1e3f2b7d5a8e9c0f1d2e3") == 62
assert hashlib.sha256(b"65a1b2c3d4e5f60718293a4b").digest()[:8].hex() == "b514a686c55d063b"
assert bucket("65a1b2c3d4e5f60718293a4b") == 11
assert bucket("42") == 37

rng = random.Random(20240611)


def hexs(n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


keys = [
    # The worked examples first.
    key("text", "U4af4980629c1e3f2b7d5a8e9c0f1d2e3"),
    key("objectid", "65a1b2c3d4e5f60718293a4b"),
    key("int", 42),
    # Text of several shapes.
    key("text", ""),
    key("text", " "),
    key("text", "42"),  # the text "42" hashes like the integer 42
    key("text", "ユーザー-1"),
    key("text", "café"),
    key("text", "cafe\u0301"),  # the same word, decomposed: a different string, hashed as given
    key("text", "Ümlaut ß"),
    key("text", "😀 emoji"),
    key("text", "line\nbreak\ttab"),
    key("text", 'quote " backslash \\'),
    key("text", "null"),
    key("text", "x" * 1000),
    key("text", "65A1B2C3D4E5F60718293A4B"),  # as text: not lowercased
]
keys += [key("text", "U" + hexs(32)) for _ in range(70)]  # LINE user ids
keys += [key("text", f"user-{i}") for i in range(20)]
keys += [key("text", f"order:{rng.randrange(10**9)}") for _ in range(10)]
keys += [key("text", "".join(chr(rng.randrange(0x3040, 0x30ff)) for _ in range(rng.randrange(1, 8)))) for _ in range(8)]
# ObjectIds as 24 hex digits; a few in upper case, which the routers lowercase.
keys += [key("objectid", hexs(24)) for _ in range(50)]
keys += [key("objectid", hexs(24).upper()) for _ in range(3)]
keys += [key("objectid", "000000000000000000000000"), key("objectid", "ffffffffffffffffffffffff")]
# Integers, as decimal strings (no float in the way).
ints = [0, 1, -1, 7, -42, 99, 100, 2**31 - 1, -(2**31), 2**32, 2**53 - 1, 2**53, 2**53 + 1,
        -(2**53) - 1, 2**63 - 1, -(2**63), 10**15, -(10**18)]
ints += [rng.randrange(-(2**63), 2**63) for _ in range(15)]
ints += [rng.randrange(0, 10**6) for _ in range(15)]
keys += [key("int", n) for n in ints]
assert len(keys) >= 200, len(keys)


# Decisions, by a second implementation of the rules.
def decide(view, service, bucket_, age_ms, max_age_ms):
    """Returns (route, epoch) or ("error", None)."""
    if view is None or age_ms > max_age_ms:  # never act on a view older than maxAgeMs
        return "hold", None
    s = next((s for s in view["services"] if s["service"] == service), None)
    if s is None:
        return "error", None
    f = s.get("fenced")
    if f is not None and f["from"] <= bucket_ < f["to"]:
        return "hold", s["epoch"]
    return ("service" if bucket_ < s["percent"] else "monolith"), s["epoch"]


def text_with_bucket(b: int) -> dict:
    """The first `k-<i>` text key whose bucket is b."""
    i = 0
    while bucket(f"k-{i}") != b:
        i += 1
    return key("text", f"k-{i}")


def service(name, percent, epoch, fenced=None, moving=None, **extra):
    s = {"service": name, "percent": percent, "epoch": epoch, "phase": "stable" if moving is None else "drain"}
    if moving is not None:
        s["moving"] = moving
    s.update({"fenced": fenced, "canFlip": False, "canRollback": True, "forwardLag": 0, "reverseLag": None})
    s.update(extra)
    return s


def fence(frm, to, epoch, losing):
    return {"from": frm, "to": to, "epoch": epoch, "losing": losing, "drain": {"state": "not_yet"},
            "set_at": {"$date": {"$numberLong": "1718000000000"}}}


VIEW = {"services": [
    service("customers_db", 10, 4),
    service("conversations_db", 10, 3, fence(10, 50, 3, "monolith"), [10, 50]),
    service("billing_db", 50, 7, fence(10, 50, 7, "service"), [50, 10], canRollback=False,
            whyNoRollback="the reverse feed has not started"),
    service("everything_db", 100, 2),
    service("nothing_db", 0, 1),
]}
VIEW_EXTRA = {"generatedBy": "a future ficus", "services": [
    dict(service("customers_db", 40, 9), newField={"nested": [1, 2]}, fenced=None)]}

cases = [
    ("owned by the service", VIEW, "customers_db", text_with_bucket(3), 0, None),
    ("at the share: the monolith's", VIEW, "customers_db", text_with_bucket(10), 0, None),
    ("just below the share", VIEW, "customers_db", text_with_bucket(9), 0, None),
    ("the worked example, monolith", VIEW, "customers_db", key("text", "U4af4980629c1e3f2b7d5a8e9c0f1d2e3"), 500, None),
    ("fenced: first fenced bucket", VIEW, "conversations_db", text_with_bucket(10), 0, None),
    ("fenced: ObjectId in the fence", VIEW, "conversations_db", key("objectid", "65a1b2c3d4e5f60718293a4b"), 0, None),
    ("fenced: last fenced bucket", VIEW, "conversations_db", text_with_bucket(49), 0, None),
    ("fence end is exclusive", VIEW, "conversations_db", text_with_bucket(50), 0, None),
    ("below a fence", VIEW, "conversations_db", text_with_bucket(9), 0, None),
    ("moving down: fenced", VIEW, "billing_db", key("int", 42), 0, None),
    ("moving down: still the service's below the fence", VIEW, "billing_db", text_with_bucket(5), 0, None),
    ("moving down: the monolith's above", VIEW, "billing_db", text_with_bucket(62), 0, None),
    ("100%: bucket 99 is the service's", VIEW, "everything_db", text_with_bucket(99), 0, None),
    ("0%: bucket 0 is the monolith's", VIEW, "nothing_db", text_with_bucket(0), 0, None),
    ("exactly maxAge old: still acted on", VIEW, "customers_db", text_with_bucket(3), 10_000, None),
    ("older than maxAge: hold", VIEW, "customers_db", text_with_bucket(3), 10_001, None),
    ("older than a configured maxAge: hold", VIEW, "customers_db", text_with_bucket(62), 2_500, 2_000),
    ("young enough for a configured maxAge", VIEW, "customers_db", text_with_bucket(62), 1_999, 2_000),
    ("no view at all: hold", None, "customers_db", text_with_bucket(3), 0, None),
    ("unknown service: error", VIEW, "orders_db", text_with_bucket(3), 0, None),
    ("unknown service with a stale view: hold (nothing to judge it by)", VIEW, "orders_db", text_with_bucket(3), 20_000, None),
    ("unknown fields are ignored", VIEW_EXTRA, "customers_db", text_with_bucket(39), 0, None),
    ("int 42 at 38%: service", {"services": [service("s", 38, 1)]}, "s", key("int", 42), 0, None),
    ("int 42 at 37%: monolith", {"services": [service("s", 37, 1)]}, "s", key("int", 42), 0, None),
    ("i64 max", {"services": [service("s", 50, 1)]}, "s", key("int", 2**63 - 1), 0, None),
]
decisions = []
for name, view, svc, k, age, max_age in cases:
    route, epoch = decide(view, svc, k["bucket"], age, max_age or DEFAULT_MAX_AGE_MS)
    d = {"name": name, "view": view, "service": svc, "key": {"kind": k["kind"], "value": k["value"]},
         "bucket": k["bucket"], "ageMs": age}
    if max_age is not None:
        d["maxAgeMs"] = max_age
    d["expect"] = route
    if route != "error":
        d["epoch"] = epoch
    decisions.append(d)
# Every route appears, and the fence cases do hold.
assert {d["expect"] for d in decisions} == {"service", "monolith", "hold", "error"}
assert [d["expect"] for d in decisions[4:7]] == ["hold"] * 3

# Bodies that are no view (each router must refuse them and keep the view it had).
bad_views = [
    ("not JSON", "<html>503</html>"),
    ("empty body", ""),
    ("services missing", '{"status":"ok"}'),
    ("services not a list", '{"services":{"service":"customers_db"}}'),
    ("percent above 100", '{"services":[{"service":"a","percent":101,"epoch":1,"fenced":null}]}'),
    ("percent negative", '{"services":[{"service":"a","percent":-1,"epoch":1,"fenced":null}]}'),
    ("percent not an integer", '{"services":[{"service":"a","percent":10.5,"epoch":1,"fenced":null}]}'),
    ("percent a string", '{"services":[{"service":"a","percent":"10","epoch":1,"fenced":null}]}'),
    ("epoch missing", '{"services":[{"service":"a","percent":10,"fenced":null}]}'),
    ("service missing", '{"services":[{"percent":10,"epoch":1,"fenced":null}]}'),
    # The fence decides holds: a view that does not say whether there is one is not acted on.
    ("fenced missing", '{"services":[{"service":"a","percent":10,"epoch":1}]}'),
    ("fence backwards", '{"services":[{"service":"a","percent":10,"epoch":1,"fenced":{"from":50,"to":10,"epoch":1}}]}'),
    ("fence beyond 100", '{"services":[{"service":"a","percent":10,"epoch":1,"fenced":{"from":10,"to":101,"epoch":1}}]}'),
    ("fence without its end", '{"services":[{"service":"a","percent":10,"epoch":1,"fenced":{"from":10,"epoch":1}}]}'),
    ("fence without its epoch", '{"services":[{"service":"a","percent":10,"epoch":1,"fenced":{"from":10,"to":50}}]}'),
    ("service name not a string", '{"services":[{"service":7,"percent":10,"epoch":1,"fenced":null}]}'),
    ("a service twice", '{"services":[{"service":"a","percent":10,"epoch":1,"fenced":null},'
                        '{"service":"a","percent":50,"epoch":2,"fenced":null}]}'),
]
good_views = [
    ("no services", '{"services":[]}'),
    ("a whole ficus answer", json.dumps(VIEW)),
    ("unknown fields", json.dumps(VIEW_EXTRA)),
]

out = {
    "about": "Generated by clients/gen_vectors.py (Python hashlib, independent of the routers). "
             "Do not edit by hand: change the script and run it again.",
    "defaultMaxAgeMs": DEFAULT_MAX_AGE_MS,
    "keys": keys,
    "decisions": decisions,
    "badViews": [{"name": n, "body": b} for n, b in bad_views],
    "goodViews": [{"name": n, "body": b} for n, b in good_views],
}
with open(os.path.join(HERE, "vectors.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"wrote {len(keys)} keys, {len(decisions)} decisions, {len(bad_views)} bad and {len(good_views)} good views")
