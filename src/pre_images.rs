//! Change-stream pre-images, which reverse sync needs on both sides of a service that writes
//! back: where they must be on, turning them on, and finding where they are off.
//!
//! A change stream reports a document's state before an update, replace or delete only where
//! its collection records pre-images (`changeStreamPreAndPostImages`). Without them:
//!
//! - in a **service collection written back**, a delete carries no routing key, so it cannot be
//!   judged by ownership and never reaches the monolith, and a replace cannot say what it
//!   changed;
//! - in a **monolith collection write-backs land in**, a change to a document the service owns
//!   has no previous state to merge against (every field the sides hold differently becomes a
//!   conflict), and a delete of one is not applied.
//!
//! So every path that creates or swaps a service collection written back leaves pre-images on
//! ([`crate::sink::MongoSink::open`], the shadow build of `ficus replay`), `ficus topics apply`
//! turns them on on both sides, and the safe cutover's preflight refuses a move while one is off
//! ([`problems`]). The option is a property of the collection, so a collection created without
//! it (an application's first insert creates one implicitly) or renamed in from elsewhere has
//! none until it is turned on.

use bson::doc;
use futures::TryStreamExt;
use mongodb::Database;
use mongodb::options::ChangeStreamPreAndPostImages;

use crate::mongo;
use crate::transform::ServiceTransforms;

/// Whether a collection records pre-images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    On,
    Off,
    /// No such collection: the first write will create one without them.
    Missing,
}

/// What [`ensure`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// They were on.
    Already,
    /// The collection did not exist; it was created with them on.
    Created,
    /// They were off; they are on now.
    TurnedOn,
}

/// The collections a service needs pre-images on, on each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs<'a> {
    /// Monolith collections write-backs land in (those the reversible transforms read).
    pub monolith: Vec<&'a str>,
    /// Service collections written back.
    pub service: Vec<&'a str>,
}

/// Where a service that writes back needs pre-images (pure). Nothing for one that never does.
pub fn needs(transforms: &ServiceTransforms) -> Needs<'_> {
    Needs { monolith: transforms.written_back_into(), service: transforms.written_back() }
}

/// The collections of one side whose pre-images are not on, as messages naming each (pure).
/// `side` says what the collections are to the service, `without` what goes wrong without them.
pub fn problems_of(database: &str, states: &[(&str, State)], side: &str, without: &str) -> Vec<String> {
    states
        .iter()
        .filter_map(|(coll, state)| {
            let what = match state {
                State::On => return None,
                State::Off => "pre-images are off on",
                State::Missing => "pre-images cannot be on yet: there is no collection",
            };
            Some(format!(
                "{what} {database}.{coll} ({side}): {without}; `ficus topics apply` creates it or turns them on"
            ))
        })
        .collect()
}

/// Everything in the way of reverse sync's pre-images for one service, on both sides: one
/// message per collection, naming it. Empty when all are on.
pub async fn problems(
    transforms: &ServiceTransforms,
    monolith: &Database,
    service: &Database,
) -> Result<Vec<String>, mongodb::error::Error> {
    let needs = needs(transforms);
    let name = transforms.service();
    let mut out = Vec::new();
    for (db, collections, side, without) in [
        (
            monolith,
            &needs.monolith,
            format!("the monolith collection {name}'s write-backs land in"),
            "a monolith change to a document the service owns could not be merged against its previous state, \
             and a delete of one would not be applied",
        ),
        (
            service,
            &needs.service,
            format!("a collection {name} writes back"),
            "a service delete there could not be routed and would never reach the monolith",
        ),
    ] {
        let mut states = Vec::with_capacity(collections.len());
        for coll in collections {
            states.push((*coll, state(db, coll).await?));
        }
        out.extend(problems_of(db.name(), &states, &side, without));
    }
    Ok(out)
}

/// Whether a collection records pre-images.
pub async fn state(db: &Database, coll: &str) -> Result<State, mongodb::error::Error> {
    let mut cursor = db.list_collections().filter(doc! { "name": coll }).await?;
    let Some(spec) = cursor.try_next().await? else { return Ok(State::Missing) };
    let on = spec.options.change_stream_pre_and_post_images.is_some_and(|p| p.enabled);
    Ok(if on { State::On } else { State::Off })
}

/// Makes a collection record pre-images: creates it with them on when it does not exist,
/// turns them on (`collMod`) when they are off.
pub async fn ensure(db: &Database, coll: &str) -> Result<Ensured, mongodb::error::Error> {
    const NAMESPACE_EXISTS: i32 = 48;
    // Twice at most: another process may create the collection between the look and the create.
    for _ in 0..2 {
        match state(db, coll).await? {
            State::On => return Ok(Ensured::Already),
            State::Off => break,
            State::Missing => {
                let on = ChangeStreamPreAndPostImages::builder().enabled(true).build();
                match db.create_collection(coll).change_stream_pre_and_post_images(on).await {
                    Ok(()) => return Ok(Ensured::Created),
                    Err(e) if mongo::error_code(&e) == Some(NAMESPACE_EXISTS) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    db.run_command(doc! { "collMod": coll, "changeStreamPreAndPostImages": { "enabled": true } }).await?;
    Ok(Ensured::TurnedOn)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn shipped(service: &str) -> ServiceTransforms {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let topics = crate::config::topics::load(&root.join("topics")).unwrap_or_else(|r| panic!("{r}"));
        let all = crate::transform::load_all(&root.join("transforms"), &topics).unwrap_or_else(|r| panic!("{r}"));
        all.into_iter().find(|s| s.service() == service).unwrap()
    }

    #[test]
    fn a_service_needs_them_where_it_writes_back_and_where_that_lands() {
        // customers are written back; customer_events (built from purchases) never are.
        let customers = shipped("customers_db");
        assert_eq!(needs(&customers), Needs { monolith: vec!["customers"], service: vec!["customers"] });
        // conversations_db writes back webhook events too, into the monolith's logs, whose
        // topic definition does not ask for pre-images: the write-back needs them all the same.
        let conversations = shipped("conversations_db");
        assert_eq!(
            needs(&conversations),
            Needs { monolith: vec!["conversations", "logs"], service: vec!["conversations", "webhook_events"] }
        );
        // A rollup is never written back: products_db writes back its products only.
        let products = shipped("products_db");
        assert_eq!(needs(&products), Needs { monolith: vec!["products"], service: vec!["products"] });
    }

    #[test]
    fn every_collection_without_them_is_named_with_its_side_and_remedy() {
        let states = [("customers", State::Off), ("orders", State::On), ("notes", State::Missing)];
        let p = problems_of("customers_db", &states, "a collection customers_db writes back", "deletes are lost");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("pre-images are off on customers_db.customers (a collection customers_db writes back)")
        );
        assert!(p[0].contains("deletes are lost") && p[0].contains("ficus topics apply"), "{}", p[0]);
        assert!(p[1].contains("there is no collection customers_db.notes"), "{}", p[1]);
        assert!(problems_of("x", &[("a", State::On)], "s", "w").is_empty());
        assert!(problems_of("x", &[], "s", "w").is_empty());
    }
}
