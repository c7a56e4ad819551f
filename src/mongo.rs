//! Shared MongoDB plumbing: connecting, and sorting driver errors into what to do about them.
//!
//! Every adapter that talks to MongoDB (source, checkpoints, sinks, the event store) connects and
//! classifies errors here, so "retry", "re-snapshot" and "stop" mean the same thing everywhere.

use std::time::Duration;

use mongodb::Client;
use mongodb::error::{Error, ErrorKind};
use mongodb::options::ClientOptions;

use crate::config::redact_text;

pub use crate::retry::{Classify, ErrorClass};

impl Classify for mongodb::error::Error {
    fn class(&self) -> ErrorClass {
        classify(self)
    }
}

/// Server error codes that mean "try again".
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    43,    // CursorNotFound (change streams resume from the token)
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
    112,   // WriteConflict
    251,   // NoSuchTransaction
];

/// Server error codes that mean the change stream's history is gone.
const HISTORY_LOST_CODES: &[i32] = &[
    286, // ChangeStreamHistoryLost
    280, // ChangeStreamFatalError (resume token not found)
    136, // CappedPositionLost
    260, // InvalidResumeToken
];

/// The server error code, if the error carries one.
pub fn error_code(e: &Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

/// Sorts a server error code (from a command's `writeErrors`, say).
pub fn classify_code(code: i32) -> ErrorClass {
    if HISTORY_LOST_CODES.contains(&code) {
        ErrorClass::HistoryLost
    } else if TRANSIENT_CODES.contains(&code) {
        ErrorClass::Transient
    } else {
        ErrorClass::Fatal
    }
}

/// Sorts a driver error.
pub fn classify(e: &Error) -> ErrorClass {
    if let Some(code) = error_code(e) {
        let class = classify_code(code);
        if class != ErrorClass::Fatal {
            return class;
        }
    }
    if [
        "ResumableChangeStreamError",
        "RetryableWriteError",
        "TransientTransactionError",
        "UnknownTransactionCommitResult",
        "NetworkError",
    ]
    .iter()
    .any(|l| e.contains_label(l))
    {
        return ErrorClass::Transient;
    }
    match e.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => ErrorClass::Transient,
        _ => ErrorClass::Fatal,
    }
}

/// A driver error as text, with any connection string in it redacted.
pub fn describe(e: &Error) -> String {
    redact_text(&e.to_string())
}

/// Connects (lazily, as the driver does) with ficus's application name and timeouts that fail
/// fast enough for the retry loop to take over.
pub async fn connect(uri: &str, app: &str) -> Result<Client, Error> {
    let mut opts = ClientOptions::parse(uri).await?;
    opts.app_name = Some(format!("ficus-{app}"));
    if opts.server_selection_timeout.is_none() {
        opts.server_selection_timeout = Some(Duration::from_secs(10));
    }
    if opts.connect_timeout.is_none() {
        opts.connect_timeout = Some(Duration::from_secs(5));
    }
    // One client serves every role of a process (see `clients`): the tail's and reverse tails'
    // change streams each hold a connection for up to `max_await`, and every consumer writes
    // in parallel. The Rust driver's default of 10 (other drivers: 100) left the tail waiting
    // for a connection behind writes hung on a dropped network; 100 as the other drivers do,
    // unless the URI says otherwise (`maxPoolSize`).
    if opts.max_pool_size.is_none() {
        opts.max_pool_size = Some(100);
    }
    Client::with_options(opts)
}

/// A raw document as a [`bson::Document`], converted element by element. Read documents this
/// way rather than through serde, which takes sub-documents with keys like `$oid` or
/// `$numberInt` (legal field names) for Extended JSON type wrappers.
pub fn to_document(raw: &bson::RawDocument) -> Result<bson::Document, bson::error::Error> {
    bson::Document::try_from(raw)
}

/// Whether an error inside a transaction means "run the whole transaction again": a write
/// conflict with another transaction, or a transaction the server already aborted.
pub fn transaction_conflict(e: &Error) -> bool {
    e.contains_label("TransientTransactionError") || matches!(error_code(e), Some(112 | 251))
}

/// Starts a transaction (snapshot reads, majority journaled commit) on `session`.
pub async fn begin(session: &mut mongodb::ClientSession) -> Result<(), Error> {
    use mongodb::options::{Acknowledgment, ReadConcern, WriteConcern};
    session
        .start_transaction()
        .read_concern(ReadConcern::snapshot())
        .write_concern(WriteConcern::builder().w(Acknowledgment::Majority).journal(true).build())
        .await
}

/// Ends a transaction whose body returned `outcome`: commits it (again, when the result of a
/// commit is unknown) or aborts it. `None` means "run the whole transaction again": it
/// conflicted with another (a bounded number of `attempts`; then the conflict is returned, and
/// the caller's backoff takes over). `conflict` says whether one of the body's errors is such a
/// conflict.
pub async fn finish<T, E: From<Error>>(
    session: &mut mongodb::ClientSession,
    outcome: Result<T, E>,
    attempts: &mut u32,
    conflict: impl Fn(&E) -> bool,
) -> Option<Result<T, E>> {
    *attempts += 1;
    let retry = *attempts < 20;
    match outcome {
        Ok(value) => {
            let mut unknown = 0u64;
            loop {
                match session.commit_transaction().await {
                    Ok(()) => return Some(Ok(value)),
                    // The commit may or may not have happened: committing again is safe, a few
                    // times. Past that the error goes up (transient) and the caller's retry applies
                    // the batch again, which its version-guarded writes make harmless.
                    Err(e) if e.contains_label("UnknownTransactionCommitResult") && unknown < 3 => {
                        unknown += 1;
                        tracing::warn!(error = %describe(&e), "transaction commit result unknown; committing again");
                        tokio::time::sleep(Duration::from_millis(200 * unknown)).await;
                    }
                    Err(e) if transaction_conflict(&e) && retry => break,
                    Err(e) => return Some(Err(e.into())),
                }
            }
        }
        Err(e) => {
            let _ = session.abort_transaction().await;
            if !(conflict(&e) && retry) {
                return Some(Err(e));
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(5 * u64::from(*attempts))).await;
    None
}

/// The cluster time of a database's server now (its latest operation time): every change
/// committed before the call is at or before it.
pub async fn cluster_time(db: &mongodb::Database) -> Result<Option<bson::Timestamp>, Error> {
    let reply = db.run_command(bson::doc! { "ping": 1 }).await?;
    if let Ok(ts) = reply.get_timestamp("operationTime") {
        return Ok(Some(ts));
    }
    Ok(reply.get_document("$clusterTime").and_then(|d| d.get_timestamp("clusterTime")).ok())
}
