//! The writes a transform produces: what the sinks carry out, one [`WriteOp`] at a time.
//!
//! The forward half (`apply`), the way back (`reverse`) and every sink speak these types; kept
//! on their own, `apply` and `reverse` name a write without importing the transform's
//! top-level module (which re-exports them for everyone else).

use bson::{Bson, Document, doc};

use crate::cutover::rules::{Apply, Why};
use crate::event::Version;

/// One write into a service database.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// Make the target document with `_id == id` in `collection` equal to `doc` (full state;
    /// `doc` holds the natural key field too). The sink adds `_id` and its own version metadata.
    Upsert { collection: String, id: Bson, doc: Document },
    /// Remove the target document. `id: None` means "whatever this source document
    /// (`event.data.document_id`) produced in that collection": used when a delete arrives
    /// without a before-state and the natural key is unknown; the sink resolves it through the
    /// source-id metadata it keeps on every document.
    Delete { collection: String, id: Option<Bson> },
    /// Derived-from-many targets (`products_db.categories`): source aggregate `member` now belongs
    /// to `group` (`None`: to no group any more, deleted or filtered out). The sink keeps one
    /// membership record per member and maintains on the group document (`_id` = group value)
    /// the member count in `count_field`, the distinct values in each `distinct` target array,
    /// and the constant `group_fields`.
    Rollup {
        collection: String,
        group: Option<Bson>,
        member: Bson,
        count_field: String,
        /// Target array field, and this member's value for it.
        distinct: Vec<(String, Option<Bson>)>,
        group_fields: Document,
    },
    /// A snapshot of `source_collection` (taken at version `before`) has reached this
    /// partition's end of it: once every one of the topic's `partitions` has reported, the
    /// documents of `collection` that came from `source_collection` and are still older than
    /// `before` were not in the snapshot, so the source no longer has them, and they are
    /// removed (rollup members leave their groups) as their deletes would have done.
    Sweep {
        collection: String,
        source_collection: String,
        before: Version,
        partition: i32,
        partitions: i32,
        /// For a rollup target: its count field and distinct fields.
        rollup: Option<(String, Vec<String>)>,
    },
    /// A target built from array elements mirrors the elements the source document has now:
    /// of what this source document (`event.data.document_id`) built in `collection`, only the
    /// documents `keep` names stay; the others (elements pulled, replaced away, filtered out)
    /// are removed as a delete would, unless they are newer than this event.
    Retain { collection: String, keep: Vec<Bson> },
    /// A document the service owns (see `cutover`) changed on the monolith's side: the
    /// forward write is merged field by field instead of overwriting what the owner holds.
    /// `doc` is the target document the monolith's new state makes (`None`: the monolith
    /// deleted it), `base` what its previous state made, the last point both sides agreed on.
    /// `why` says why it is merged rather than applied as the owner's (`cutover::rules`);
    /// `arrays`, which arrays of the document merge element by element, by which id field.
    Merge {
        collection: String,
        id: Bson,
        doc: Option<Document>,
        base: Base,
        why: Why,
        arrays: Vec<(String, Option<String>)>,
    },
    /// The echo of the service's own write-back to this document: nothing to write (the
    /// document already says it), but its version is recorded beside the document (deleted:
    /// as a tombstone), so that nothing older (a replay, a redelivery) lands over what the
    /// service wrote, even where the service's application wrote the document plain.
    Witness { collection: String, id: Bson, deleted: bool },
}

/// Reverse sync's one write: a change of a service document, to be written back into the
/// monolith through the reverse of the transform that writes `collection` (the service
/// collection), as the owner's patch or merged as a non-owner's (`apply`). A type of its own,
/// apart from [`WriteOp`]: the monolith's sink takes only these and a service database's sink
/// never does, and the compiler says so (each sink names its [`crate::sink::Sink::Op`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WriteBack {
    pub collection: String,
    pub change: Box<crate::event::EventData>,
    pub apply: Apply,
}

/// What every write a sink takes can say about itself.
pub trait Write: std::fmt::Debug + Clone + Send + Sync + 'static {
    /// The collection the write is for.
    fn collection(&self) -> &str;
    /// The one document the write touches, where it names one.
    fn touched(&self) -> Option<&Bson>;
    /// The write as one document (see [`WriteOp::to_document`]).
    fn to_document(&self) -> Document;
}

impl Write for WriteOp {
    fn collection(&self) -> &str {
        WriteOp::collection(self)
    }

    fn touched(&self) -> Option<&Bson> {
        match self {
            WriteOp::Upsert { id, .. } | WriteOp::Merge { id, .. } | WriteOp::Witness { id, .. } => Some(id),
            WriteOp::Delete { id, .. } => id.as_ref(),
            WriteOp::Rollup { member, .. } => Some(member),
            WriteOp::Sweep { .. } | WriteOp::Retain { .. } => None,
        }
    }

    fn to_document(&self) -> Document {
        WriteOp::to_document(self)
    }
}

impl Write for WriteBack {
    fn collection(&self) -> &str {
        &self.collection
    }

    fn touched(&self) -> Option<&Bson> {
        Some(&self.change.document_id)
    }

    fn to_document(&self) -> Document {
        let apply = match self.apply {
            Apply::Owner => "owner",
            Apply::Merge(why) => why.as_str(),
        };
        doc! {
            "op": "writeBack", "collection": &self.collection, "change": self.change.op.as_str(),
            "id": self.change.document_id.clone(), "apply": apply,
        }
    }
}

/// What the monolith's side last agreed with the owner on, for a [`WriteOp::Merge`].
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    /// The document is new to the monolith's side (an insert): nothing to agree on.
    New,
    /// The target document the monolith's previous state made.
    Was(Document),
    /// Unknown (no pre-image): every field the two sides hold differently is a conflict.
    Unknown,
}

impl WriteOp {
    /// The collection the write is for.
    pub fn collection(&self) -> &str {
        match self {
            WriteOp::Upsert { collection, .. }
            | WriteOp::Delete { collection, .. }
            | WriteOp::Rollup { collection, .. }
            | WriteOp::Sweep { collection, .. }
            | WriteOp::Retain { collection, .. }
            | WriteOp::Merge { collection, .. }
            | WriteOp::Witness { collection, .. } => collection,
        }
    }

    /// The write as one document, `{ op: "upsert" | "delete" | "rollup", collection, … }` with
    /// absent options as null: the shape of the golden fixtures, and readable in logs.
    pub fn to_document(&self) -> Document {
        let opt = |v: &Option<Bson>| v.clone().unwrap_or(Bson::Null);
        match self {
            WriteOp::Upsert { collection, id, doc } => {
                doc! { "op": "upsert", "collection": collection, "id": id.clone(), "doc": doc.clone() }
            }
            WriteOp::Delete { collection, id } => {
                doc! { "op": "delete", "collection": collection, "id": opt(id) }
            }
            WriteOp::Rollup { collection, group, member, count_field, distinct, group_fields } => {
                let distinct: Document = distinct.iter().map(|(field, v)| (field.clone(), opt(v))).collect();
                doc! {
                    "op": "rollup", "collection": collection, "group": opt(group), "member": member.clone(),
                    "countField": count_field, "distinct": distinct, "groupFields": group_fields.clone(),
                }
            }
            WriteOp::Sweep { collection, source_collection, before, partition, partitions, rollup } => {
                doc! {
                    "op": "sweep", "collection": collection, "sourceCollection": source_collection,
                    "before": before.as_str(), "partition": partition, "partitions": partitions,
                    "rollup": rollup.as_ref().map(|(count, distinct)| doc! { "countField": count, "distinct": distinct.clone() }),
                }
            }
            WriteOp::Retain { collection, keep } => {
                doc! { "op": "retain", "collection": collection, "keep": keep.clone() }
            }
            WriteOp::Merge { collection, id, doc, base, why, .. } => {
                let base = match base {
                    Base::New => Bson::String("new".into()),
                    Base::Unknown => Bson::String("unknown".into()),
                    Base::Was(d) => Bson::Document(d.clone()),
                };
                doc! {
                    "op": "merge", "collection": collection, "id": id.clone(), "doc": doc.clone(), "base": base,
                    "why": why.as_str(),
                }
            }
            WriteOp::Witness { collection, id, deleted } => {
                doc! { "op": "witness", "collection": collection, "id": id.clone(), "deleted": deleted }
            }
        }
    }
}
