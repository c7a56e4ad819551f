//! Rollup memberships in a service database: one member joining or leaving a group, the group
//! recomputed from its members, in the batch's transaction or one of its own.

use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::ClientSession;

use super::MongoSink;
use crate::event::Version;
use crate::mongo;
use crate::sink::rollup::GroupTally;
use crate::sink::{MEMBERS_PREFIX, META, SinkError, Versioned};

/// One rollup membership change, as a [`WriteOp::Rollup`] carries it.
#[derive(Clone, Copy)]
pub(super) struct Membership<'a> {
    pub(super) group: Option<&'a Bson>,
    pub(super) member: &'a Bson,
    pub(super) count_field: &'a str,
    pub(super) distinct: &'a [(String, Option<Bson>)],
    pub(super) group_fields: &'a Document,
}

impl MongoSink {
    /// Applies one rollup membership, recomputing the groups it touches; inside the batch's
    /// transaction when there is one, in a transaction of its own otherwise, so concurrent
    /// consumers never interleave a stale count.
    pub(super) async fn rollup(
        &self,
        s: &mut ClientSession,
        txn: bool,
        v: &Versioned,
        collection: &str,
        m: &Membership<'_>,
    ) -> Result<(), SinkError> {
        if txn {
            return Ok(self.membership(s, v, collection, m).await?);
        }
        let mut attempts = 0;
        loop {
            mongo::begin(s).await?;
            let outcome = self.membership(s, v, collection, m).await;
            if let Some(done) = mongo::finish(s, outcome, &mut attempts, mongo::transaction_conflict).await {
                return done.map_err(SinkError::from);
            }
        }
    }

    pub(super) async fn membership(
        &self,
        s: &mut ClientSession,
        v: &Versioned,
        collection: &str,
        m: &Membership<'_>,
    ) -> Result<(), mongodb::error::Error> {
        let Membership { group, member, count_field, distinct, group_fields } = *m;
        let members = self.db.collection::<Document>(&format!("{MEMBERS_PREFIX}{collection}"));
        let groups = self.db.collection::<Document>(collection);
        let previous = members.find_one(doc! { "_id": member.clone() }).session(&mut *s).await?;
        if previous.as_ref().and_then(|p| p.get_str("v").ok()).is_some_and(|pv| v.version.held_by(pv)) {
            return Ok(()); // an equal or newer membership is already applied
        }
        let old_group = previous.as_ref().and_then(|p| p.get("g")).filter(|g| !matches!(g, Bson::Null)).cloned();
        let mut values = Document::new();
        for (field, value) in distinct {
            values.insert(field, value.clone().unwrap_or(Bson::Null));
        }
        let record = doc! { "_id": member.clone(), "g": group.cloned().unwrap_or(Bson::Null), "d": values, "v": v.version.as_str(), "event": &v.event_id };
        members.replace_one(doc! { "_id": member.clone() }, record).upsert(true).session(&mut *s).await?;
        let mut affected: Vec<Bson> = group.into_iter().cloned().collect();
        if let Some(g) = old_group
            && !affected.contains(&g)
        {
            affected.push(g);
        }
        for g in affected {
            let in_group: Vec<Document> =
                members.find(doc! { "g": g.clone() }).session(&mut *s).await?.stream(&mut *s).try_collect().await?;
            if in_group.is_empty() {
                groups.delete_one(doc! { "_id": g.clone() }).session(&mut *s).await?;
                continue;
            }
            let mut tally = GroupTally::new(distinct.iter().map(|(f, _)| f.as_str()));
            for m in &in_group {
                let values = m.get_document("d").ok();
                tally.add(|field| values.and_then(|d| d.get(field)));
            }
            let mut set = tally.fields(count_field);
            // The newest member's version, so the group document is the same whatever order its
            // members' events arrived in.
            let newest = in_group
                .iter()
                .filter_map(|m| Some((Version::stored(m.get_str("v").ok()?), m.get_str("event").ok()?)))
                .max()
                .map(|(v, e)| (v.to_string(), e.to_string()))
                .unwrap_or_else(|| (v.version.to_string(), v.event_id.clone()));
            set.insert(META, doc! { "v": newest.0, "event": newest.1, "rollup": true });
            if Some(&g) == group {
                // The member's own group: its constant fields come with this event.
                let mut full = group_fields.clone();
                full.insert("_id", g.clone());
                full.extend(set);
                groups.replace_one(doc! { "_id": g }, full).upsert(true).session(&mut *s).await?;
            } else {
                // A group the member left: only the aggregates change.
                groups.update_one(doc! { "_id": g }, doc! { "$set": set }).session(&mut *s).await?;
            }
        }
        Ok(())
    }
}
