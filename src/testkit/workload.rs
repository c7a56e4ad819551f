//! Reference documents in the monolith's real shapes (`shared/reference/monolith-schema.md`),
//! legacy quirks included: snake_case, decimals as strings, flat fields the services nest.
//!
//! The demo seeds its sample monolith with these, the tests and benchmarks drive workloads with
//! them. Generation is deterministic for a given seed so runs can be compared.

use bson::{Bson, DateTime, Document, doc, oid::ObjectId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NAMES: &[&str] = &["Somchai", "Malee", "Anan", "Ploy", "Kittisak", "Nok", "Jane", "Tom"];
const CATEGORIES: &[&str] = &["supplements", "skincare", "devices", "vitamins", "herbal"];
const SUBCATEGORIES: &[&str] = &["daily", "premium", "kids", "senior"];
const INTENTS: &[&str] = &["greeting", "product_question", "purchase", "health_question", "complaint"];

/// A deterministic generator of reference documents.
pub struct Workload {
    rng: StdRng,
    base: i64,
}

impl Workload {
    pub fn new(seed: u64) -> Self {
        Workload { rng: StdRng::seed_from_u64(seed), base: 1_767_225_600_000 } // 2026-01-01
    }

    fn date(&mut self) -> DateTime {
        DateTime::from_millis(self.base + self.rng.random_range(0..300 * 86_400_000_i64))
    }

    fn decimal(&mut self, max: u32) -> String {
        format!("{}.{:02}", self.rng.random_range(0..max), self.rng.random_range(0..100))
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.rng.random_range(0..xs.len())]
    }

    /// Every monolith collection of the reference, in seeding order.
    pub const COLLECTIONS: [&'static str; 8] =
        ["customers", "conversations", "products", "cache_entries", "logs", "metrics", "api_keys", "knowledge"];

    /// The `i`-th reference document of a collection (conversations with `messages` messages);
    /// `None` for a collection the reference does not have.
    pub fn document(&mut self, collection: &str, i: u64, messages: u64) -> Option<Document> {
        Some(match collection {
            "customers" => self.customer(i),
            "conversations" => self.conversation(i, messages),
            "products" => self.product(i),
            "cache_entries" => self.cache_entry(i),
            "logs" => self.log(i),
            "metrics" => self.metric(i),
            "api_keys" => self.api_key(i),
            "knowledge" => self.knowledge(i),
            _ => return None,
        })
    }

    pub fn user_id(i: u64) -> String {
        format!("U{i:032x}")
    }

    pub fn sku(i: u64) -> String {
        format!("SKU-{i:06}")
    }

    /// `linechatbot.customers`, about 2 KB with a handful of purchases.
    pub fn customer(&mut self, i: u64) -> Document {
        let purchases: Vec<Bson> = (0..self.rng.random_range(0..6))
            .map(|p| {
                let d = self.date();
                let amount = self.decimal(5000);
                let sku = Self::sku(self.rng.random_range(0..500));
                Bson::Document(doc! {
                    "id": format!("P-{i}-{p}"), "product_id": &sku, "product_name": format!("Product {sku}"),
                    "amount": amount, "currency": "THB", "date": d,
                    "status": self.pick(&["paid", "paid", "refunded", "pending"]),
                })
            })
            .collect();
        let (last_seen, joined, created, updated) = (self.date(), self.date(), self.date(), self.date());
        doc! {
            "_id": ObjectId::new(),
            "user_id": Self::user_id(i),
            "name": format!("{} {}", self.pick(NAMES), i),
            "lang": self.pick(&["en", "th"]),
            "tz": "Asia/Bangkok",
            "country": self.pick(&["TH", "TH", "SG", "US"]),
            "prefs": ["health", "wellness"],
            "interests": [self.pick(CATEGORIES), self.pick(CATEGORIES)],
            "tier": self.pick(&["basic", "basic", "premium", "vip"]),
            "ltv": self.decimal(20_000),
            "stats": {
                "msgs": self.rng.random_range(0..500_i32),
                "sessions": self.rng.random_range(0..50_i32),
                "avg_session_sec": self.rng.random_range(5.0..900.0),
                "last_seen": last_seen,
                "joined": joined,
                "score": self.rng.random_range(0.0..1.0),
            },
            "purchases": purchases,
            "created_at": created,
            "updated_at": updated,
        }
    }

    /// One conversation message.
    pub fn message(&mut self, n: u64) -> Document {
        let from = self.pick(&["user", "bot", "bot", "system"]);
        let ts = self.date();
        let mut m = doc! {
            "id": format!("m{n}"),
            "from": from,
            "text": "สวัสดีครับ I would like to know more about vitamin C dosage for adults, please.",
            "ts": ts,
        };
        if from == "user" {
            m.insert("intent", self.pick(INTENTS));
            m.insert("sentiment", self.pick(&["positive", "neutral", "negative"]));
            m.insert("confidence", self.rng.random_range(0.5..1.0));
        }
        m
    }

    /// `linechatbot.conversations` with `messages` messages (400 make about 64 KB).
    pub fn conversation(&mut self, i: u64, messages: u64) -> Document {
        let msgs: Vec<Bson> = (0..messages).map(|n| Bson::Document(self.message(n))).collect();
        let (started, last, created, updated) = (self.date(), self.date(), self.date(), self.date());
        doc! {
            "_id": ObjectId::new(),
            "user_id": Self::user_id(i % 1000),
            "user_name": self.pick(NAMES),
            "state": self.pick(&["active", "ended", "paused"]),
            "lang": self.pick(&["en", "th"]),
            "messages": msgs,
            "ai": {
                "provider": self.pick(&["deepSeek", "openRouter"]),
                "session_id": format!("S-{i:08}"),
                "tokens": self.rng.random_range(0..50_000_i32),
                "avg_ms": self.rng.random_range(100.0..3000.0),
                "success_rate": self.rng.random_range(0.8..1.0),
            },
            "started_at": started,
            "last_activity": last,
            "meta": { "channel": "line", "campaign": "winter" },
            "created_at": created,
            "updated_at": updated,
        }
    }

    /// `linechatbot.products`.
    pub fn product(&mut self, i: u64) -> Document {
        let (created, updated) = (self.date(), self.date());
        doc! {
            "_id": ObjectId::new(),
            "sku": Self::sku(i),
            "name_en": format!("Vitamin blend {i}"),
            "name_th": format!("วิตามินรวม {i}"),
            "desc_en": "A daily supplement.",
            "desc_th": "อาหารเสริมประจำวัน",
            "price": self.decimal(3000),
            "currency": "THB",
            "category": self.pick(CATEGORIES),
            "subcategory": self.pick(SUBCATEGORIES),
            "images": [format!("https://cdn.example/p/{i}.jpg")],
            "specs": { "weight_g": 120, "count": 60 },
            "specs_th": { "น้ำหนัก": "120 กรัม" },
            "stock": self.rng.random_range(0..200_i32),
            "reorder_at": 10_i32,
            "tags": ["vitamin", "daily"],
            "search_terms": ["vitamin c", "วิตามินซี"],
            "views": self.rng.random_range(0..10_000_i32),
            "sold": self.rng.random_range(0..500_i32),
            "rating": self.rng.random_range(1.0..5.0),
            "reviews": self.rng.random_range(0..300_i32),
            "status": self.pick(&["active", "active", "discontinued", "out_of_stock"]),
            "created_at": created,
            "updated_at": updated,
        }
    }

    /// `linechatbot.cache_entries`, alternating kinds.
    pub fn cache_entry(&mut self, i: u64) -> Document {
        let (expires, created) = (self.date(), self.date());
        let value = if i.is_multiple_of(2) {
            doc! {
                "session_id": format!("S-{:08}", i / 2), "user_id": Self::user_id(i % 1000),
                "provider": self.pick(&["deepSeek", "openRouter"]), "prompt": "Is vitamin C safe daily?",
                "response": "Yes, within the recommended dose.", "tokens": self.rng.random_range(10..2000_i32),
                "ms": self.rng.random_range(50..5000_i32), "confidence": self.rng.random_range(0.5..1.0),
                "intent": self.pick(INTENTS), "entities": ["vitamin c"],
            }
        } else {
            let updated = self.date();
            doc! {
                "query": "vitamin c dosage", "lang": "en",
                "results": [{ "title": "Vitamin C", "url": "https://example.org/vc", "summary": "About vitamin C.",
                              "source": "example.org", "relevance": 0.93, "updated": updated }],
                "search_ms": self.rng.random_range(10..900_i32), "total": 1_i32,
            }
        };
        doc! {
            "_id": ObjectId::new(),
            "key": format!("cache:{i:08}"),
            "kind": if i.is_multiple_of(2) { "ai_response" } else { "research" },
            "expires_at": expires,
            "created_at": created,
            "value": value,
        }
    }

    /// `linechatbot.logs`, about 300 B, cycling webhook / audit / security.
    pub fn log(&mut self, i: u64) -> Document {
        let ts = self.date();
        let (kind, data) = match i % 3 {
            0 => (
                "webhook",
                doc! {
                    "event_id": format!("E{i}"), "event_type": "message", "user_id": Self::user_id(i % 1000),
                    "payload": { "text": "hi" }, "status": "processed", "processing_ms": self.rng.random_range(1..200_i32),
                },
            ),
            1 => (
                "audit",
                doc! {
                    "user_id": Self::user_id(i % 1000), "action": "update", "resource": "profile",
                    "result": self.pick(&["success", "failure"]), "details": { "field": "tier" }, "ip": "10.0.0.1", "user_agent": "line/13",
                },
            ),
            _ => (
                "security",
                doc! {
                    "event_type": self.pick(&["auth_success", "auth_failure", "rate_limit_exceeded"]), "identifier": Self::user_id(i % 1000),
                    "ip": "10.0.0.2", "user_agent": "curl/8", "resource": "/api/chat", "details": {},
                    "severity": self.pick(&["low", "medium", "high", "critical"]),
                },
            ),
        };
        doc! { "_id": ObjectId::new(), "kind": kind, "ts": ts, "service": "gateway", "correlation_id": format!("c-{i}"), "data": data }
    }

    /// `linechatbot.metrics`, alternating system / provider.
    pub fn metric(&mut self, i: u64) -> Document {
        let ts = self.date();
        if i.is_multiple_of(2) {
            doc! {
                "_id": ObjectId::new(), "kind": "system", "ts": ts, "period": self.pick(&["1m", "5m", "1h", "1d"]), "service": "gateway",
                "values": { "requests": self.rng.random_range(0..10_000_i32), "responses": 990_i32, "errors": 10_i32,
                            "avg_response_time": 120.5, "p95_response_time": 300.0, "p99_response_time": 800.0,
                            "cpu_usage": 0.4, "memory_usage": 0.6, "disk_usage": 0.3 },
            }
        } else {
            doc! {
                "_id": ObjectId::new(), "kind": "provider", "ts": ts, "period": "1d", "provider": self.pick(&["deepSeek", "openRouter"]),
                "values": { "calls": 1000_i32, "success": 990_i32, "failures": 10_i32, "avg_response_time": 850.0,
                            "total_tokens": 120_000_i32, "error_types": [{ "type": "timeout", "count": 7_i32 }] },
            }
        }
    }

    /// `linechatbot.api_keys` (only the hash is ever stored).
    pub fn api_key(&mut self, i: u64) -> Document {
        let (last, exp, created, updated) = (self.date(), self.date(), self.date(), self.date());
        doc! {
            "_id": ObjectId::new(), "key_id": format!("K{i:06}"), "key_hash": format!("sha256:{:064x}", i), "name": format!("key {i}"),
            "user_id": Self::user_id(i % 1000), "perms": ["chat:read", "chat:write"], "scope": self.pick(&["admin", "user", "service"]),
            "rate": { "requests": 100_i32, "window_sec": 60_i32 }, "usage": { "total": 5000_i32, "last_used": last, "month": 300_i32 },
            "status": self.pick(&["active", "suspended", "revoked"]), "expires_at": exp, "created_at": created, "updated_at": updated,
        }
    }

    /// `linechatbot.knowledge`.
    pub fn knowledge(&mut self, i: u64) -> Document {
        let (published, updated) = (self.date(), self.date());
        doc! {
            "_id": ObjectId::new(), "topic_id": format!("T{i:05}"), "name": format!("Topic {i}"), "category": "nutrition",
            "overview": "What it is and who needs it.", "key_points": ["point one", "point two"], "recommendations": ["eat fruit"],
            "warnings": ["consult a doctor"], "sources": [{ "title": "WHO", "url": "https://who.int/x", "authority": "WHO", "published": published }],
            "th": { "overview": "ภาพรวม" }, "updated_at": updated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_sizes_are_roughly_as_documented() {
        let mut w = Workload::new(1);
        let size = |d: &Document| bson::serialize_to_vec(d).unwrap().len();
        let log = size(&w.log(0));
        let customer = size(&w.customer(1));
        let conv = size(&w.conversation(1, 400));
        assert!((200..600).contains(&log), "log {log}");
        assert!((700..4000).contains(&customer), "customer {customer}");
        assert!((40_000..100_000).contains(&conv), "conversation {conv}");
    }

    #[test]
    fn deterministic_per_seed_except_object_ids() {
        let strip = |mut d: Document| {
            d.remove("_id");
            d
        };
        assert_eq!(strip(Workload::new(7).customer(3)), strip(Workload::new(7).customer(3)));
    }
}
