//! A sink that fails on purpose: [`FaultySink`] wraps any [`Sink`] and fails the calls a test
//! chooses, by the document a batch writes or by the call's number, with an error the sink's
//! own classification calls transient or permanent ([`SinkError::class`]). The apply path's
//! answers to each (retry the batch whole, or write it one by one to isolate the culprit) can
//! so be driven in a unit test, without a server.
//!
//! ```text
//! let sink = FaultySink::new(MemorySink::default())
//!     .with(Fault::permanent(Trigger::document("U3")))      // every batch writing U3, for good
//!     .with(Fault::transient(Trigger::Call(1)).times(1));    // the first call, once
//! ```
//!
//! Every call is recorded ([`FaultySink::calls`]): the events of its batch, and the class of the
//! error injected, if one was.

use std::sync::{Mutex, MutexGuard};

use bson::Bson;

use crate::mongo::ErrorClass;
use crate::retry::Classify;
use crate::sink::{Marker, Sink, SinkError, Versioned};
use crate::transform::Write;

/// Which calls to [`Sink::apply`] a [`Fault`] strikes.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// The n-th call, counting from 1.
    Call(usize),
    /// Every call whose batch writes this document: the source document a message came from
    /// (`Versioned::source_id`), or a target document one of its writes touches.
    Document(Bson),
}

impl Trigger {
    pub fn document(key: impl Into<Bson>) -> Trigger {
        Trigger::Document(key.into())
    }

    /// Whether a write of the batch is the struck document's (every write, for a call).
    fn covers<O: Write>(&self, v: &Versioned<O>) -> bool {
        match self {
            Trigger::Call(_) => true,
            Trigger::Document(key) => v.source_id == *key || v.ops.iter().any(|op| op.touched() == Some(key)),
        }
    }
}

/// What of a struck batch reaches the wrapped sink before the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Landing {
    /// Nothing: the batch fails as a transaction does.
    #[default]
    Nothing,
    /// The writes the trigger does not cover (for a [`Trigger::Call`], all of them: the reply
    /// was lost), then the error: what a batch written without a transaction may leave.
    Rest,
}

/// One failure to inject.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub trigger: Trigger,
    /// How the error is classified: [`ErrorClass::Transient`] (the caller retries) or
    /// [`ErrorClass::Fatal`] (permanent: the caller gives the write up).
    pub class: ErrorClass,
    /// How many more calls it strikes (`None`: every one it covers).
    pub times: Option<usize>,
    pub landing: Landing,
}

impl Fault {
    /// A failure the caller should retry.
    pub fn transient(trigger: Trigger) -> Fault {
        Fault { trigger, class: ErrorClass::Transient, times: None, landing: Landing::Nothing }
    }

    /// A failure retrying cannot cure (the target refuses the document).
    pub fn permanent(trigger: Trigger) -> Fault {
        Fault { trigger, class: ErrorClass::Fatal, times: None, landing: Landing::Nothing }
    }

    /// Strikes the first `n` calls it covers only.
    pub fn times(self, n: usize) -> Fault {
        Fault { times: Some(n), ..self }
    }

    /// Lets the writes it does not cover land before failing ([`Landing::Rest`]).
    pub fn landing_the_rest(self) -> Fault {
        Fault { landing: Landing::Rest, ..self }
    }

    /// The error it fails a call with: a target's write error whose code the sink's own
    /// classification puts in this fault's class (checked, so the two cannot drift apart).
    fn error(&self, call: usize) -> SinkError {
        let (code, what) = match self.class {
            ErrorClass::Transient => (189, "PrimarySteppedDown"),
            ErrorClass::Fatal => (121, "DocumentValidationFailure"),
            ErrorClass::HistoryLost => (286, "ChangeStreamHistoryLost"),
        };
        let error = SinkError::Write {
            collection: "(injected)".into(),
            code,
            message: format!("{what}: injected by FaultySink into call {call} ({:?})", self.trigger),
        };
        assert_eq!(error.class(), self.class, "error code {code} no longer classifies as {:?}", self.class);
        error
    }
}

/// One call to the wrapped sink's `apply`.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Counting from 1.
    pub number: usize,
    /// The event ids of its batch, in order.
    pub events: Vec<String>,
    /// The class of the error injected into it, if one was.
    pub injected: Option<ErrorClass>,
}

#[derive(Default)]
struct State {
    faults: Vec<Fault>,
    calls: Vec<Call>,
}

/// Wraps a [`Sink`] and fails the calls its [`Fault`]s strike; the others go through. Where
/// several faults cover a call, the first added strikes it.
pub struct FaultySink<S> {
    inner: S,
    state: Mutex<State>,
}

impl<S: Sink> FaultySink<S> {
    pub fn new(inner: S) -> Self {
        FaultySink { inner, state: Mutex::default() }
    }

    /// Adds a fault.
    pub fn with(self, fault: Fault) -> Self {
        self.lock().faults.push(fault);
        self
    }

    /// The wrapped sink (what landed).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a call, and the fault that strikes it, if any (spending one of its times).
    fn strike(&self, batch: &[Versioned<S::Op>]) -> Option<(usize, Fault)> {
        let mut state = self.lock();
        let number = state.calls.len() + 1;
        let covers = |f: &Fault| match &f.trigger {
            Trigger::Call(n) => *n == number,
            Trigger::Document(_) => batch.iter().any(|v| f.trigger.covers(v)),
        };
        let fault = state.faults.iter_mut().find(|f| f.times != Some(0) && covers(f)).map(|f| {
            f.times = f.times.map(|n| n - 1);
            f.clone()
        });
        let events = batch.iter().map(|v| v.event_id.clone()).collect();
        state.calls.push(Call { number, events, injected: fault.as_ref().map(|f| f.class) });
        fault.map(|f| (number, f))
    }
}

impl<S: Sink> Sink for FaultySink<S> {
    type Op = S::Op;

    async fn apply(&self, batch: &[Versioned<S::Op>], marker: Option<&Marker>) -> Result<(), SinkError> {
        let Some((number, fault)) = self.strike(batch) else {
            return self.inner.apply(batch, marker).await;
        };
        if fault.landing == Landing::Rest {
            let rest: Vec<Versioned<S::Op>> = match fault.trigger {
                Trigger::Call(_) => batch.to_vec(),
                Trigger::Document(_) => {
                    // A transaction lands whole or not at all: no sink could leave part of one.
                    assert!(marker.is_none(), "a batch with a marker is one transaction: it cannot land in part");
                    batch.iter().filter(|v| !fault.trigger.covers(v)).cloned().collect()
                }
            };
            if !rest.is_empty() {
                self.inner.apply(&rest, marker).await?;
            }
        }
        Err(fault.error(number))
    }
}

#[cfg(test)]
mod tests {
    use bson::{Bson, Timestamp, doc};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::bus::Delivery;
    use crate::consume::{Applied, Applier, Forward, Item, Path, Rejects, Transformer};
    use crate::event::Message;
    use crate::event::mapping::{ChangeRecord, map_change};
    use crate::testkit::memory::MemorySink;

    fn repo(p: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    /// The shipped `customers_db` transforms, as the live consumer runs them.
    fn customers_db() -> Forward {
        let topics = crate::config::topics::load(&repo("topics")).unwrap();
        Forward::new(std::sync::Arc::new(
            crate::transform::load_service(&repo("transforms/customers_db"), &topics).unwrap(),
        ))
    }

    /// Customers `U0`..`U{n-1}` as snapshot copies at offsets 0.., each written to
    /// `customers_db.customers` under its `user_id`.
    fn customers(n: u32) -> Vec<Item> {
        let topics = crate::config::topics::load(&repo("topics")).unwrap();
        let def = topics.for_collection("customers").unwrap();
        (0..n)
            .map(|i| {
                let doc = doc! { "_id": format!("id-U{i}"), "user_id": format!("U{i}"), "name": "n", "purchases": [] };
                let record = ChangeRecord::snapshot("customers", doc, Timestamp { time: 100, increment: i + 1 });
                let event = map_change(def, "linechatbot", record).events.remove(0);
                let message = Message::Event(event);
                let at = Delivery {
                    topic: "linechatbot.customers".into(),
                    partition: 0,
                    offset: i64::from(i),
                    key: Some(message.key().as_bytes().to_vec()),
                    payload: message.encode(),
                };
                Item { at, message: Ok(message) }
            })
            .collect()
    }

    /// Applies `batch` through the one apply path, as live consumption does (rejects counted,
    /// not dead-lettered: no broker here).
    async fn apply(sink: &FaultySink<MemorySink>, batch: &[Item]) -> Applied {
        let forward = customers_db();
        let applier = Applier {
            transformer: &forward,
            sink,
            rejects: Rejects::Count,
            path: Path::Live,
            origin: None,
            judged: None,
        };
        applier.apply(batch, &CancellationToken::new()).await.unwrap()
    }

    fn held(sink: &FaultySink<MemorySink>) -> Vec<String> {
        let docs = sink.inner().documents("customers");
        docs.iter().map(|d| d.get_str("_id").unwrap().to_string()).collect()
    }

    /// How many events each call carried, and whether a fault was injected into it.
    fn shape(sink: &FaultySink<MemorySink>) -> Vec<(usize, Option<ErrorClass>)> {
        sink.calls().iter().map(|c| (c.events.len(), c.injected)).collect()
    }

    #[tokio::test]
    async fn a_document_the_target_refuses_for_good_is_isolated_and_the_rest_of_its_batch_lands() {
        let sink = FaultySink::new(MemorySink::default()).with(Fault::permanent(Trigger::document("U3")));
        let batch = customers(6);
        let done = apply(&sink, &batch).await;
        assert_eq!(done, Applied { applied: 5, rejected: 1 });
        assert_eq!(held(&sink), ["U0", "U1", "U2", "U4", "U5"]);
        // The batch, then each of its events alone: only the culprit's write fails.
        let fatal = Some(ErrorClass::Fatal);
        assert_eq!(shape(&sink), [(6, fatal), (1, None), (1, None), (1, None), (1, fatal), (1, None), (1, None)]);
        let alone: Vec<Vec<String>> = sink.calls()[1..].iter().map(|c| c.events.clone()).collect();
        let each: Vec<Vec<String>> = sink.calls()[0].events.iter().map(|e| vec![e.clone()]).collect();
        assert_eq!(alone, each, "one by one, in the batch's order");
    }

    #[tokio::test]
    async fn isolation_writes_again_what_a_failed_batch_left_behind() {
        // The batch's other writes landed before the error (no transaction): written again one
        // by one, harmlessly, and the culprit still alone rejected.
        let fault = Fault::permanent(Trigger::document("U1")).landing_the_rest();
        let sink = FaultySink::new(MemorySink::default()).with(fault);
        let done = apply(&sink, &customers(3)).await;
        assert_eq!(done, Applied { applied: 2, rejected: 1 });
        assert_eq!(held(&sink), ["U0", "U2"]);
        assert_eq!(sink.calls().len(), 4);
    }

    #[tokio::test]
    async fn a_transient_failure_retries_the_batch_whole_and_rejects_nothing() {
        let sink = FaultySink::new(MemorySink::default()).with(Fault::transient(Trigger::Call(1)));
        let done = apply(&sink, &customers(4)).await;
        assert_eq!(done, Applied { applied: 4, rejected: 0 });
        assert_eq!(held(&sink), ["U0", "U1", "U2", "U3"]);
        assert_eq!(shape(&sink), [(4, Some(ErrorClass::Transient)), (4, None)], "no isolation for a transient failure");
    }

    #[tokio::test]
    async fn a_transient_failure_while_isolating_is_retried_not_taken_for_a_culprit() {
        // Call 3 is U1 alone: it fails transiently three times (retried with backoff), then lands.
        let sink = FaultySink::new(MemorySink::default())
            .with(Fault::permanent(Trigger::document("U2")))
            .with(Fault::transient(Trigger::document("U1")).times(3));
        let done = apply(&sink, &customers(4)).await;
        assert_eq!(done, Applied { applied: 3, rejected: 1 });
        assert_eq!(held(&sink), ["U0", "U1", "U3"]);
        let (fatal, transient) = (Some(ErrorClass::Fatal), Some(ErrorClass::Transient));
        // The batch holds both: the first fault added strikes it.
        assert_eq!(
            shape(&sink),
            [(4, fatal), (1, None), (1, transient), (1, transient), (1, transient), (1, None), (1, fatal), (1, None)]
        );
    }

    #[tokio::test]
    async fn faults_strike_by_call_and_by_document_as_many_times_as_asked() {
        let sink = FaultySink::new(MemorySink::default())
            .with(Fault::transient(Trigger::Call(2)))
            .with(Fault::permanent(Trigger::document("U1")).times(1));
        let batch: Vec<Versioned> = customers(2)
            .iter()
            .map(|i| {
                let m = i.message.as_ref().unwrap();
                Versioned::of(m, customers_db().transform(m).unwrap())
            })
            .collect();
        let u0 = std::slice::from_ref(&batch[0]);
        let u1 = std::slice::from_ref(&batch[1]);
        let class = |r: Result<(), SinkError>| r.err().map(|e| e.class());
        assert_eq!(class(sink.apply(u0, None).await), None);
        assert_eq!(class(sink.apply(u0, None).await), Some(ErrorClass::Transient), "the second call");
        assert_eq!(class(sink.apply(u1, None).await), Some(ErrorClass::Fatal), "U1, once");
        assert_eq!(class(sink.apply(u1, None).await), None, "spent");
        assert_eq!(held(&sink), ["U0", "U1"]);
        // By the source document's id too, and the rest of a batch landing before the error.
        let by_source = FaultySink::new(MemorySink::default())
            .with(Fault::permanent(Trigger::Document(Bson::String("id-U0".into()))).landing_the_rest());
        assert_eq!(class(by_source.apply(&batch, None).await), Some(ErrorClass::Fatal));
        assert_eq!(held(&by_source), ["U1"]);
    }
}
