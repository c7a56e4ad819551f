//! The two directions of the one apply path: what a message becomes before the sink writes it.
//!
//! - [`Forward`]: a monolith event → the service's writes, by its transforms; then, for a
//!   service that has taken over some of its aggregates (`cutover`), each change is judged by
//!   `cutover::rules`: the owner's write (an upsert), or merged field by field into the
//!   service's document (a non-owner's, a late one, a fence violation). The echo of the
//!   service's own write-back, where the service owned the key when it was written back, is
//!   not applied again by the one target that caused it (every other target reads it), but its
//!   version is witnessed there, so nothing older (a replay, a redelivery) is ever applied over
//!   what the service wrote. The echo of a non-owner's service write, merged into the monolith,
//!   is the monolith's state like any of its changes (`rules::judge_echo`).
//! - [`Backward`]: a service event (`<service>.changes`) → a write-back into the monolith,
//!   through the reverse of the transform that writes its collection: the owner's patch, or
//!   merged as a non-owner's, judged the same way.
//!
//! Both are pure: the same message and ownership always give the same writes.

use std::sync::Arc;

use crate::cutover::ownership::{Ownership, Side};
use crate::cutover::route;
use crate::cutover::rules::{self, Apply};
use crate::event::{CanonicalEvent, Message, Op};
use crate::transform::{Base, Reverse, ServiceTransforms, TransformError, Write, WriteBack, WriteOp};

/// Turns one message into the writes its sink applies.
pub trait Transformer: Send + Sync {
    /// The writes it makes: [`WriteOp`]s into a service database, or reverse sync's
    /// [`WriteBack`]s into the monolith (the sink it feeds takes the same).
    type Op: Write;

    /// The service whose writes these are.
    fn service(&self) -> &str;
    /// The writes a message calls for; an error is permanent (the message is dead-lettered).
    fn transform(&self, m: &Message) -> Result<Vec<Self::Op>, TransformError>;
    /// Whether the message is the echo of this service's own write-back (some of its writes
    /// are skipped for that).
    fn is_echo(&self, _m: &Message) -> bool {
        false
    }
}

/// The transformer that makes a kind of write, and so the direction a consumer whose sink takes
/// that kind runs in: a service database's sink takes [`WriteOp`]s, made by [`Forward`]; the
/// monolith's takes [`WriteBack`]s, made by [`Backward`]. A consumer is typed by its sink, and
/// its direction, group and transformer follow from it.
pub trait MadeBy: Write {
    type Transformer: Transformer<Op = Self>;
    const DIRECTION: super::Direction;

    /// The transformer, judging by `ownership` (`None`: the monolith owns everything).
    fn transformer(transforms: Arc<ServiceTransforms>, ownership: Option<Ownership>) -> Self::Transformer;
}

impl MadeBy for WriteOp {
    type Transformer = Forward;
    const DIRECTION: super::Direction = super::Direction::Forward;

    fn transformer(transforms: Arc<ServiceTransforms>, ownership: Option<Ownership>) -> Forward {
        Forward { transforms, ownership }
    }
}

impl MadeBy for WriteBack {
    type Transformer = Backward;
    const DIRECTION: super::Direction = super::Direction::Reverse;

    fn transformer(transforms: Arc<ServiceTransforms>, ownership: Option<Ownership>) -> Backward {
        Backward { transforms, ownership }
    }
}

/// Monolith events into a service database.
#[derive(Clone)]
pub struct Forward {
    pub transforms: Arc<ServiceTransforms>,
    /// The service's ownership record, if it ever had one (none: the monolith owns all), as a
    /// view fresh enough to judge the batch has it.
    pub ownership: Option<Ownership>,
}

impl Forward {
    /// The transforms alone: the monolith owns everything.
    pub fn new(transforms: Arc<ServiceTransforms>) -> Self {
        Forward { transforms, ownership: None }
    }

    /// How the event's change is applied (see `cutover::rules`); a document without a routing
    /// key is the monolith's.
    pub fn judge(&self, ev: &CanonicalEvent) -> Apply {
        if self.ownership.is_none() {
            return Apply::Owner;
        }
        match self.transforms.route_of(ev) {
            Some(key) => {
                rules::judge(self.ownership.as_ref(), Side::Monolith, route::bucket_of(&key), ev.position.cluster_time)
            }
            None => Apply::Owner,
        }
    }

    /// How the echo of this service's own write-back is applied to the target that caused it
    /// (`rules::judge_echo`; `None`: skipped).
    fn judge_echo(&self, ev: &CanonicalEvent) -> Option<Apply> {
        match self.transforms.route_of(ev) {
            Some(key) => rules::judge_echo(self.ownership.as_ref(), route::bucket_of(&key), ev.position.cluster_time),
            None => Some(Apply::Owner),
        }
    }

    /// Settles an event's writes with ownership and echoes (see the module header).
    fn settle(&self, ev: &CanonicalEvent, ops: Vec<WriteOp>) -> Vec<WriteOp> {
        let service = self.transforms.service();
        let echo_of = ev.origin.as_ref().filter(|o| o.service == service).and_then(|o| o.collection.as_deref());
        let (apply, echo) = (self.judge(ev), echo_of.map(|_| self.judge_echo(ev)));
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let apply = match echo {
                Some(echo) if echo_of == Some(op.collection()) => match echo {
                    Some(apply) => apply,
                    None => {
                        metrics::counter!("ficus_echoes_skipped_total", "service" => service.to_string(), "side" => "consume")
                            .increment(1);
                        // Not applied again; its version witnessed, so nothing older lands over it.
                        match op {
                            WriteOp::Upsert { collection, id, .. } => {
                                out.push(WriteOp::Witness { collection, id, deleted: false })
                            }
                            WriteOp::Delete { collection, id: Some(id) } => {
                                out.push(WriteOp::Witness { collection, id, deleted: true })
                            }
                            _ => {}
                        }
                        continue;
                    }
                },
                _ => apply,
            };
            let Apply::Merge(why) = apply else {
                out.push(op);
                continue;
            };
            let reverse = self.transforms.reverse_for(op.collection());
            match (op, reverse) {
                (op, None) => out.push(op),
                (op, Some(r)) if r.source_collection() != ev.data.collection => out.push(op),
                (WriteOp::Upsert { collection, id, doc }, Some(r)) => {
                    let (base, arrays) = (base(&r, ev), r.array_keys());
                    out.push(WriteOp::Merge { collection, id, doc: Some(doc), base, why, arrays })
                }
                (WriteOp::Delete { collection, id: Some(id) }, Some(r)) => {
                    let (base, arrays) = (base(&r, ev), r.array_keys());
                    out.push(WriteOp::Merge { collection, id, doc: None, base, why, arrays })
                }
                (WriteOp::Delete { collection, id: None }, Some(_)) => {
                    // Without a pre-image the document is unknown; the owner's state stands.
                    tracing::warn!(%service, %collection, event = %ev.id, "a monolith delete of an owned document without a pre-image: not applied (enable pre-images)");
                    metrics::counter!("ficus_conflicts_total", "service" => service.to_string(), "side" => "monolith")
                        .increment(1);
                }
                (op, Some(_)) => out.push(op),
            }
        }
        out
    }
}

/// An update's exact result: its description applied to its pre-image (`None` without both).
/// A merge weighs a change against its pre-image (the base), so the other side must be what the
/// change itself made, never the document looked up after it, which may hold later changes
/// (ficus's own repairs among them): against the pre-image those looked like the monolith's,
/// met the owner's values as conflicts, and a repair wrote the owner's stale counter back over
/// the monolith's (three increments lost in the ownership chaos test). [`Forward::transform`]
/// gives every write it judges, merges and the owner's upserts alike, this document.
fn exact_after(ev: &CanonicalEvent) -> Option<bson::Document> {
    ev.data.update_applied_to(ev.data.before.as_ref()?)?.ok()
}

/// What the monolith's side held before the change, as the service's document.
fn base(r: &Reverse<'_>, ev: &CanonicalEvent) -> Base {
    match (ev.data.op, &ev.data.before) {
        (Op::Insert, _) => Base::New,
        (Op::Snapshot, _) | (_, None) => Base::Unknown,
        (_, Some(before)) => match r.image(before) {
            Ok(Some(d)) => Base::Was(d),
            Ok(None) => Base::New, // it was outside the target (`when`)
            Err(_) => Base::Unknown,
        },
    }
}

impl Transformer for Forward {
    type Op = WriteOp;

    fn service(&self) -> &str {
        self.transforms.service()
    }

    fn is_echo(&self, m: &Message) -> bool {
        m.as_event()
            .and_then(|ev| ev.origin.as_ref())
            .is_some_and(|o| o.service == self.transforms.service() && o.collection.is_some())
    }

    fn transform(&self, m: &Message) -> Result<Vec<WriteOp>, TransformError> {
        // Judged by ownership, an update is applied as what it made of its pre-image, never as
        // the document looked up after it: that one may hold later changes (a tail that looked
        // it up late, or published it again after a restart), and laid down under this event's
        // version it put a later state into the service's document, against which the next
        // merges found conflicts that were not there and a repair wrote that state back over
        // the monolith's newer one (two increments lost in the ownership chaos test).
        let exact = match m {
            Message::Event(ev) if self.ownership.is_some() => exact_after(ev).map(|after| {
                let mut ev = ev.clone();
                ev.data.after = Some(after);
                Message::Event(ev)
            }),
            _ => None,
        };
        let m = exact.as_ref().unwrap_or(m);
        let ops = self.transforms.apply_message(m)?;
        Ok(match m {
            Message::Event(ev) if self.ownership.is_some() || ev.origin.is_some() => self.settle(ev, ops),
            _ => ops,
        })
    }
}

/// Service events into the monolith (reverse sync).
#[derive(Clone)]
pub struct Backward {
    pub transforms: Arc<ServiceTransforms>,
    /// The service's ownership record, as a view fresh enough to judge the batch has it.
    pub ownership: Option<Ownership>,
}

impl Backward {
    /// How a service change is written back (see `cutover::rules`): the owner's patch, or merged
    /// as a non-owner's. A change without a routing key (a delete without its pre-image) is
    /// taken as the owner's: the reverse tail only publishes it when it knew.
    fn judge(&self, reverse: &Reverse<'_>, ev: &CanonicalEvent) -> Apply {
        let id_only = bson::doc! { "_id": ev.data.document_id.clone() };
        let image = ev.data.after.as_ref().or(ev.data.before.as_ref()).unwrap_or(&id_only);
        match reverse.route_value(image) {
            Some(key) => {
                rules::judge(self.ownership.as_ref(), Side::Service, route::bucket_of(&key), ev.position.cluster_time)
            }
            None => Apply::Owner,
        }
    }
}

impl Transformer for Backward {
    type Op = WriteBack;

    fn service(&self) -> &str {
        self.transforms.service()
    }

    fn transform(&self, m: &Message) -> Result<Vec<WriteBack>, TransformError> {
        let Message::Event(ev) = m else { return Ok(Vec::new()) };
        let collection = &ev.data.collection;
        let Some(reverse) = self.transforms.reverse_for(collection) else {
            return Err(TransformError {
                file: format!("transforms/{}", self.transforms.service()).into(),
                transform: collection.clone(),
                field: "(collection)".into(),
                reason: format!("{collection} is not written back to the monolith (no reverse)"),
            });
        };
        let apply = self.judge(&reverse, ev);
        Ok(vec![WriteBack { collection: collection.clone(), change: Box::new(ev.data.clone()), apply }])
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bson::{Bson, DateTime, Timestamp, doc};

    use super::*;
    use crate::cutover::ownership::Step;
    use crate::event::Origin;
    use crate::event::mapping::{ChangeRecord, map_change};

    fn repo(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    fn customers() -> Arc<ServiceTransforms> {
        let topics = crate::config::topics::load(&repo("topics")).unwrap();
        Arc::new(crate::transform::load_service(&repo("transforms/customers_db"), &topics).unwrap())
    }

    fn customer(user: &str, name: &str) -> bson::Document {
        doc! { "_id": format!("id-{user}"), "user_id": user, "name": name, "ltv": "1.00", "purchases": [] }
    }

    /// An update of a customer committed at `time`, with its pre-image.
    fn update(user: &str, before: &str, after: &str, time: u32) -> CanonicalEvent {
        let topics = crate::config::topics::load(&repo("topics")).unwrap();
        let mut r = ChangeRecord::snapshot("customers", customer(user, after), Timestamp { time, increment: 1 });
        r.op = Op::Update;
        r.before = Some(customer(user, before));
        r.index = 1;
        map_change(topics.for_collection("customers").unwrap(), "linechatbot", r).events.remove(0)
    }

    fn at(percent: u8, time: u32) -> Ownership {
        let ts = Timestamp { time, increment: 0 };
        Ownership {
            service: "customers_db".into(),
            epoch: 1,
            revision: 0,
            percent,
            history: vec![Step {
                epoch: 1,
                percent,
                at_monolith: ts,
                at_service: ts,
                set_at: DateTime::now(),
                forced: true,
                pending: false,
                lifted: None,
            }],
            updated: DateTime::now(),
            fenced: None,
        }
    }

    /// Two users on either side of 50%: bucket("U-owned-3") < 50 <= bucket("U-free-0").
    fn users() -> (String, String) {
        let find = |prefix: &str, owned: bool| {
            (0..).map(|i| format!("{prefix}-{i}")).find(|k| (route::bucket(k) < 50) == owned).unwrap()
        };
        (find("U-owned", true), find("U-free", false))
    }

    #[test]
    fn owned_documents_merge_others_upsert_and_ownership_is_judged_at_the_change() {
        let f = Forward { transforms: customers(), ownership: Some(at(50, 100)) };
        let (owned, free) = users();
        let kinds = |ev: &CanonicalEvent| {
            f.transform(&Message::Event(ev.clone()))
                .unwrap()
                .iter()
                .filter(|op| op.collection() == "customers")
                .map(|op| op.to_document().get_str("op").unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(&update(&owned, "a", "b", 200)), ["merge"]);
        assert_eq!(kinds(&update(&free, "a", "b", 200)), ["upsert"]);
        // Committed before the cutover (the monolith owned it then) and applied after it: a
        // late change, merged, so it cannot erase what the service has written since.
        assert_eq!(kinds(&update(&owned, "a", "b", 50)), ["merge"]);
        let why = |ev: &CanonicalEvent| {
            f.transform(&Message::Event(ev.clone())).unwrap().into_iter().find_map(|op| match op {
                WriteOp::Merge { why, .. } => Some(why),
                _ => None,
            })
        };
        assert_eq!(why(&update(&owned, "a", "b", 50)), Some(crate::cutover::rules::Why::Late));
        assert_eq!(why(&update(&owned, "a", "b", 200)), Some(crate::cutover::rules::Why::NonOwner));
        // The merge's base is what the monolith's previous state made.
        let ops = f.transform(&Message::Event(update(&owned, "a", "b", 200))).unwrap();
        let merge = ops.iter().find(|op| op.collection() == "customers");
        let Some(WriteOp::Merge { base: Base::Was(b), doc: Some(d), .. }) = merge else { panic!("{ops:?}") };
        assert_ne!(b, d);
        // No ownership record: plain upserts.
        assert_eq!(
            Forward::new(customers()).transform(&Message::Event(update(&owned, "a", "b", 200))).unwrap().len(),
            ops.len()
        );
    }

    #[test]
    fn only_the_target_that_caused_an_echo_skips_it() {
        let (owned, _) = users();
        let f = Forward { transforms: customers(), ownership: Some(at(50, 100)) };
        let mut echo = update(&owned, "a", "b", 200);
        echo.data.after.as_mut().unwrap().insert(
            "purchases",
            vec![Bson::Document(doc! { "id": "P1", "product_id": "SKU-1", "amount": "10.50", "currency": "THB" })],
        );
        let all = f.transform(&Message::Event(echo.clone())).unwrap();
        echo.origin = Some(Origin { service: "customers_db".into(), collection: Some("customers".into()) });
        let rest = f.transform(&Message::Event(echo.clone())).unwrap();
        assert!(all.iter().any(|op| op.collection() == "customers"));
        // The target that caused it writes nothing, but witnesses its version.
        let own: Vec<&WriteOp> = rest.iter().filter(|op| op.collection() == "customers").collect();
        assert!(
            matches!(own.as_slice(), [WriteOp::Witness { deleted: false, .. }]),
            "only a witness of the echo: {rest:?}"
        );
        assert_eq!(rest.len() - 1, all.iter().filter(|op| op.collection() != "customers").count());
        assert!(!rest.is_empty(), "customer_events still reads the write-back");
        // Another service's echo is input like any other change.
        echo.origin = Some(Origin { service: "conversations_db".into(), collection: Some("customers".into()) });
        assert_eq!(f.transform(&Message::Event(echo)).unwrap(), all);
    }

    #[test]
    fn a_merge_weighs_the_change_itself_never_the_document_looked_up_after_it() {
        let topics = crate::config::topics::load(&repo("topics")).unwrap();
        let (owned, _) = users();
        let f = Forward { transforms: customers(), ownership: Some(at(50, 100)) };
        // The monolith renamed "a" to "b"; by the time the tail looked the document up, a later
        // change had made it "c".
        let looked_up_late = |user: &str| {
            let mut r = ChangeRecord::snapshot("customers", customer(user, "c"), Timestamp { time: 200, increment: 1 });
            r.op = Op::Update;
            r.before = Some(customer(user, "a"));
            r.changed = Some(doc! { "name": "b" });
            r.index = 1;
            Message::Event(map_change(topics.for_collection("customers").unwrap(), "linechatbot", r).events.remove(0))
        };
        let ops = f.transform(&looked_up_late(&owned)).unwrap();
        let Some(WriteOp::Merge { doc: Some(d), base: Base::Was(b), .. }) =
            ops.iter().find(|op| op.collection() == "customers")
        else {
            panic!("{ops:?}")
        };
        assert_eq!(b.get_str("displayName").unwrap(), "a");
        assert_eq!(d.get_str("displayName").unwrap(), "b", "the change's own result: {d}");
        // Applied as the owner's too: the upsert lays down what the update made, under its
        // version, not the later state the look-up found.
        let (_, free) = users();
        let ops = f.transform(&looked_up_late(&free)).unwrap();
        let Some(WriteOp::Upsert { doc: d, .. }) = ops.iter().find(|op| op.collection() == "customers") else {
            panic!("{ops:?}")
        };
        assert_eq!(d.get_str("displayName").unwrap(), "b", "the change's own result: {d}");
    }

    #[test]
    fn the_echo_of_a_non_owners_write_back_brings_the_monolith_state_to_the_service() {
        let (owned, free) = users();
        let f = Forward { transforms: customers(), ownership: Some(at(50, 100)) };
        let echo = |user: &str, time: u32| {
            let mut ev = update(user, "a", "b", time);
            ev.origin = Some(Origin { service: "customers_db".into(), collection: Some("customers".into()) });
            f.transform(&Message::Event(ev))
                .unwrap()
                .into_iter()
                .filter(|op| op.collection() == "customers")
                .map(|op| op.to_document().get_str("op").unwrap().to_string())
                .collect::<Vec<_>>()
        };
        // The monolith owns the key: the merged write-back's state is applied as the owner's.
        assert_eq!(echo(&free, 200), ["upsert"]);
        // The service owned it when it wrote back: skipped, witnessed.
        assert_eq!(echo(&owned, 200), ["witness"]);
        // Written back before the service owned it: merged, late.
        assert_eq!(echo(&owned, 50), ["merge"]);
    }
}
