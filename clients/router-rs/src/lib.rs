//! `ficus-router`: the application side of ficus's ownership contract. An application embeds it
//! to tell, for each write, whether the key belongs to the service, to the monolith, or must be
//! held for now (a move under way, or no fresh view of who owns what). The contract is ficus's
//! README ("What applications do"); `clients/README.md` shows how to use this crate.
//!
//! It has no HTTP client: the application reads `GET <base>/cutover?instance=<ID>` (see [`url`])
//! with its own, at least every `max_age` (see [`Router::needs_refresh`]), and hands each 200
//! answer's body to [`Router::observe`]. A non-200 answer is no view: don't observe it.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use ficus_router::{Key, Route, Router};
//!
//! let mut router = Router::new(Duration::from_secs(10));
//! let sent = Instant::now(); // when the request was sent: the view's age counts from here
//! let body = r#"{"services":[{"service":"customers_db","percent":10,"epoch":4,"fenced":null}]}"#;
//! router.observe(body, sent).unwrap();
//! let d = router.route("customers_db", Key::Int(42), Instant::now()).unwrap();
//! assert_eq!((d.route, d.bucket, d.epoch), (Route::Monolith, 37, Some(4)));
//! ```

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

/// The longest a view may be acted on by default (ficus's `cutover.view_max_age_secs`).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------
// The routing function.

/// The bucket (0..=99) of a routing key given as its string form: SHA-256 of its UTF-8, the
/// digest's first 8 bytes as a big-endian unsigned 64-bit integer, modulo 100 (the contract).
pub fn bucket(key: &str) -> u8 {
    let digest = Sha256::digest(key.as_bytes());
    let first: [u8; 8] = digest[..8].try_into().expect("a SHA-256 digest has 32 bytes");
    (u64::from_be_bytes(first) % 100) as u8
}

/// A routing key, by the type the monolith stores it as. Other BSON types have no key here:
/// ficus hashes them as Extended JSON, which this crate does not guess at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// A string: hashed as it is.
    Text(&'a str),
    /// An ObjectId as 24 hex digits (either case): hashed as its lowercase hex.
    ObjectIdHex(&'a str),
    /// A 32- or 64-bit integer: hashed in decimal.
    Int(i64),
}

impl Key<'_> {
    /// The key's bucket, or why it has none (an ObjectId that is not 24 hex digits).
    pub fn bucket(&self) -> Result<u8, KeyError> {
        match *self {
            Key::Text(text) => Ok(bucket(text)),
            Key::Int(n) => Ok(bucket(&n.to_string())),
            Key::ObjectIdHex(hex) => {
                if hex.len() != 24 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(KeyError { value: hex.to_string() });
                }
                Ok(bucket(&hex.to_ascii_lowercase()))
            }
        }
    }
}

impl<'a> From<&'a str> for Key<'a> {
    fn from(text: &'a str) -> Self {
        Key::Text(text)
    }
}

impl From<i64> for Key<'_> {
    fn from(n: i64) -> Self {
        Key::Int(n)
    }
}

impl From<i32> for Key<'_> {
    fn from(n: i32) -> Self {
        Key::Int(n.into())
    }
}

/// A key that cannot be routed: an ObjectId given as something other than 24 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// What was given as the ObjectId's hex.
    pub value: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ficus router: key {:?} is no ObjectId: an ObjectId's hex is 24 hex digits", self.value)
    }
}

impl std::error::Error for KeyError {}

// ------------------------------------------------------------------------------------------
// The view: what `GET <base>/cutover?instance=<ID>` answers.

/// The URL of ficus's view for an application instance: `<base>/cutover?instance=<ID>`, the
/// instance percent-encoded (ficus records the epoch each instance saw: that is how a fence
/// knows it holds).
pub fn url(base: &str, instance: &str) -> String {
    let mut out = format!("{}/cutover?instance=", base.trim_end_matches('/'));
    for b in instance.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// ficus's answer: each service's cutover state. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct View {
    pub services: Vec<ServiceView>,
}

/// One service's state. A decision uses `service`, `percent`, `epoch` and `fenced` (all
/// required); the rest is for display and is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub service: String,
    /// The service owns the buckets below this (0..=100).
    pub percent: u8,
    /// Grows whenever what applications must do changes (a fence, a flip).
    pub epoch: i64,
    /// The next step of a move under way, or `stable`.
    #[serde(default)]
    pub phase: String,
    /// The move under way: from and to.
    #[serde(default)]
    pub moving: Option<(u8, u8)>,
    /// The buckets being moved, whose writes are held. Must be present (`null` when there is
    /// no fence): a view that does not say whether there is one is not acted on.
    #[serde(deserialize_with = "present")]
    pub fenced: Option<Fence>,
    #[serde(default)]
    pub can_flip: bool,
    #[serde(default)]
    pub can_rollback: bool,
    #[serde(default)]
    pub why_no_rollback: Option<String>,
    #[serde(default)]
    pub forward_lag: Option<i64>,
    #[serde(default)]
    pub reverse_lag: Option<i64>,
}

/// Buckets `[from, to)` being moved, fenced at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Fence {
    pub from: u8,
    pub to: u8,
    pub epoch: i64,
    /// The side losing the buckets: `monolith` or `service`.
    #[serde(default)]
    pub losing: Option<String>,
}

impl Fence {
    /// Whether a bucket is fenced.
    pub fn holds(&self, bucket: u8) -> bool {
        (self.from..self.to).contains(&bucket)
    }
}

/// A nullable field that must be present (serde would take a missing `Option` as `None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::deserialize(d)
}

impl View {
    /// Parses and checks a `/cutover` body.
    pub fn parse(body: &str) -> Result<View, ViewError> {
        let view: View = serde_json::from_str(body).map_err(ViewError::Json)?;
        let mut seen = HashSet::new();
        for s in &view.services {
            let bad = |what: String| Err(ViewError::Invalid { service: s.service.clone(), what });
            if s.service.is_empty() {
                return bad("the service name is empty".into());
            }
            if !seen.insert(s.service.as_str()) {
                return bad("it is listed twice".into());
            }
            if s.percent > 100 {
                return bad(format!("percent {} is above 100", s.percent));
            }
            if let Some(f) = &s.fenced
                && !(f.from <= f.to && f.to <= 100)
            {
                return bad(format!("fenced [{}, {}) is not a range within 0..100", f.from, f.to));
            }
        }
        Ok(view)
    }

    /// A service's state.
    pub fn service(&self, name: &str) -> Option<&ServiceView> {
        self.services.iter().find(|s| s.service == name)
    }
}

/// A body that is no view. The router keeps the view it had (which then ages out into holds).
#[derive(Debug)]
pub enum ViewError {
    /// Not JSON, or not of the view's shape (serde_json says which field, at which line and
    /// column).
    Json(serde_json::Error),
    /// A service's state makes no sense.
    Invalid { service: String, what: String },
}

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ViewError::Json(e) => write!(f, "ficus router: the /cutover body is not a view: {e}"),
            ViewError::Invalid { service, what } => {
                write!(f, "ficus router: the /cutover body is not a view: service {service:?}: {what}")
            }
        }
    }
}

impl std::error::Error for ViewError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ViewError::Json(e) => Some(e),
            ViewError::Invalid { .. } => None,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Decisions.

/// Where a write goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The service owns the key: write there. If that write fails, never send it to the
    /// monolith: call [`Router::write_failed`], then retry the service or fail the request.
    Service,
    /// The monolith owns the key.
    Monolith,
    /// Neither may take the write now: queue it, or answer "retry shortly".
    Hold(Hold),
}

impl Route {
    /// `service`, `monolith` or `hold`.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Service => "service",
            Route::Monolith => "monolith",
            Route::Hold(_) => "hold",
        }
    }
}

/// Why a write is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// No view has been read yet.
    NoView,
    /// The view is older than the longest it may be acted on.
    Stale { age: Duration, max_age: Duration },
    /// A write failed since the view was read: it is being read again.
    RereadAfterFailedWrite,
    /// The key's bucket is being moved: held until a view shows no fence.
    Fenced { from: u8, to: u8, epoch: i64 },
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::NoView => write!(f, "no fresh view: none has been read yet"),
            Hold::Stale { age, max_age } => write!(
                f,
                "no fresh view: the last one is {} ms old (at most {} ms)",
                age.as_millis(),
                max_age.as_millis()
            ),
            Hold::RereadAfterFailedWrite => write!(f, "no fresh view: re-reading it after a failed write"),
            Hold::Fenced { from, to, epoch } => {
                write!(f, "fenced: buckets [{from}, {to}) are moving (epoch {epoch}); queue the write or retry shortly")
            }
        }
    }
}

/// A decision for one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub route: Route,
    /// The key's bucket.
    pub bucket: u8,
    /// The service's epoch in the view used (`None` when no view was).
    pub epoch: Option<i64>,
}

impl Decision {
    /// Why the write is held (`None` when it is not).
    pub fn reason(&self) -> Option<String> {
        match &self.route {
            Route::Hold(h) => Some(h.to_string()),
            _ => None,
        }
    }
}

/// A write that cannot be routed at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The key cannot be routed.
    Key(KeyError),
    /// The view lists no such service (a typo, or a service ficus does not keep).
    UnknownService { service: String, known: Vec<String> },
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::Key(e) => e.fmt(f),
            RouteError::UnknownService { service, known } => {
                write!(f, "ficus router: the view lists no service {service:?} (it lists ")?;
                if known.is_empty() {
                    write!(f, "none)")
                } else {
                    write!(f, "{})", known.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", "))
                }
            }
        }
    }
}

impl std::error::Error for RouteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RouteError::Key(e) => Some(e),
            RouteError::UnknownService { .. } => None,
        }
    }
}

impl From<KeyError> for RouteError {
    fn from(e: KeyError) -> Self {
        RouteError::Key(e)
    }
}

/// Where a write to `key` of `service` goes, by `view` (with its age; `None`: no view). Pure.
/// A bad key is an error whatever the view; with no view young enough, the write is held
/// (an unknown service too: there is nothing to judge it by).
pub fn decide(
    view: Option<(&View, Duration)>,
    max_age: Duration,
    service: &str,
    key: Key<'_>,
) -> Result<Decision, RouteError> {
    let bucket = key.bucket()?;
    let held = |hold, epoch| Ok(Decision { route: Route::Hold(hold), bucket, epoch });
    // Never act on a view older than max_age; with none that young, hold.
    let view = match view {
        None => return held(Hold::NoView, None),
        Some((_, age)) if age > max_age => return held(Hold::Stale { age, max_age }, None),
        Some((view, _)) => view,
    };
    let Some(s) = view.service(service) else {
        let known = view.services.iter().map(|s| s.service.clone()).collect();
        return Err(RouteError::UnknownService { service: service.to_string(), known });
    };
    // A fenced bucket [from, to) is being moved: hold its writes until a view shows no fence.
    if let Some(f) = &s.fenced
        && f.holds(bucket)
    {
        return held(Hold::Fenced { from: f.from, to: f.to, epoch: f.epoch }, Some(s.epoch));
    }
    // A service at P% owns the keys whose bucket is below P.
    let route = if bucket < s.percent { Route::Service } else { Route::Monolith };
    Ok(Decision { route, bucket, epoch: Some(s.epoch) })
}

// ------------------------------------------------------------------------------------------
// The router: the latest view and what it allows.

/// Keeps the latest view and decides by it. The application reads the view (see
/// [`Router::needs_refresh`]) and hands it to [`Router::observe`].
#[derive(Debug, Clone)]
pub struct Router {
    max_age: Duration,
    /// The view acted on and when it was asked for.
    current: Option<(View, Instant)>,
    /// A write failed since the view was read: decisions hold until the next view.
    reread: bool,
}

impl Default for Router {
    fn default() -> Self {
        Router::new(DEFAULT_MAX_AGE)
    }
}

impl Router {
    /// A router that never acts on a view older than `max_age` (ficus's
    /// `cutover.view_max_age_secs`: [`DEFAULT_MAX_AGE`] unless ficus's config changes it).
    pub fn new(max_age: Duration) -> Router {
        Router { max_age, current: None, reread: false }
    }

    /// The URL of ficus's view for an instance: see [`url`].
    pub fn url(base: &str, instance: &str) -> String {
        url(base, instance)
    }

    /// Takes a `/cutover` body (of a 200 answer), read by a request sent at `read_at`: the
    /// view's age counts from then, since ficus answers with what its store says at some
    /// moment after it. A body that is no view is refused and the old view kept (it ages out
    /// into holds). A view read before the one held (answers that crossed) is ignored.
    pub fn observe(&mut self, body: &str, read_at: Instant) -> Result<(), ViewError> {
        let view = View::parse(body)?;
        if let Some((_, held_at)) = &self.current
            && read_at < *held_at
        {
            return Ok(());
        }
        self.current = Some((view, read_at));
        self.reread = false;
        Ok(())
    }

    /// Where a write to `key` of `service` goes at `now`: see [`decide`]. Holds while the view
    /// is older than `max_age`, or since [`Router::write_failed`] until the next view.
    pub fn route(&self, service: &str, key: Key<'_>, now: Instant) -> Result<Decision, RouteError> {
        if self.reread {
            let bucket = key.bucket()?;
            return Ok(Decision { route: Route::Hold(Hold::RereadAfterFailedWrite), bucket, epoch: None });
        }
        let view = self.current.as_ref().map(|(v, at)| (v, now.saturating_duration_since(*at)));
        decide(view, self.max_age, service, key)
    }

    /// Call when a write to the service failed. It only forces a re-read of the view
    /// ([`Router::needs_refresh`] says true; decisions hold until the next [`Router::observe`]:
    /// read the view with a request sent after this call). It never sends the write to the
    /// monolith: retry the service or fail the request.
    pub fn write_failed(&mut self) {
        self.reread = true;
    }

    /// Whether to read the view now: none yet, a write failed since, or the view is half
    /// `max_age` old (read again that often, so that one failed read does not start holds).
    pub fn needs_refresh(&self, now: Instant) -> bool {
        self.reread
            || match &self.current {
                None => true,
                Some((_, at)) => now.saturating_duration_since(*at) >= self.refresh_every(),
            }
    }

    /// How often to read the view: half of `max_age`.
    pub fn refresh_every(&self) -> Duration {
        self.max_age / 2
    }

    /// The view decisions use, if any.
    pub fn view(&self) -> Option<&View> {
        self.current.as_ref().map(|(v, _)| v)
    }

    /// The longest a view is acted on.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }
}
