//! The move lock: the command driving a service's move holds it (a lease in
//! `<store.db>.leases`, `cutover/<service>`), so two commands never run one move's steps
//! together. A holder killed on this host is taken over at once; elsewhere once it expires.
//! `ficus replay` holds it too: a replay judges ownership once for its whole run, so no move
//! may change it meanwhile.

use std::time::Duration;

use mongodb::Database;

use super::CutoverError;
use crate::commands::Event;
use crate::tail::lease::Lease;

/// How long a `ficus cutover`'s move lock lives unrenewed (it is renewed every third of it).
pub(super) const MOVE_LOCK_TTL: Duration = Duration::from_secs(15);

/// The lock of one service's moves: the command driving a move holds it (a lease in
/// `<store.db>.leases`, `cutover/<service>`), so two commands never run one move's steps
/// together. A holder killed on this host is taken over at once; elsewhere once it expires.
pub(crate) struct MoveLock {
    lease: Lease,
    epoch: i64,
    renewal: tokio::task::JoinHandle<()>,
    lost: tokio_util::sync::CancellationToken,
}

impl MoveLock {
    /// Takes the lock, or names its live holder.
    pub(crate) async fn take(
        store: &Database,
        service: &str,
        progress: &(dyn Fn(Event<'_>) + Sync),
    ) -> Result<Result<MoveLock, String>, CutoverError> {
        let host = crate::config::host_name();
        let holder = format!("{host}:{}", std::process::id());
        let name = format!("cutover/{service}");
        let lease = Lease::new(store, &name, &holder, MOVE_LOCK_TTL);
        let epoch = match lease.try_acquire().await? {
            Some(epoch) => epoch,
            None => {
                let held = crate::tail::lease::holding(store, &name).await?;
                let by = held.map_or_else(|| "?".to_string(), |h| h.holder);
                let gone = by
                    .rsplit_once(':')
                    .filter(|(h, _)| *h == host)
                    .and_then(|(_, pid)| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !crate::ops::presence::process_alive(pid));
                match lease.take_over(&by).await? {
                    Some(epoch) if gone => {
                        progress(Event::Info(&format!("{service}: took over the move lock of {by}, which is gone")));
                        epoch
                    }
                    _ => return Ok(Err(by)),
                }
            }
        };
        let lost = tokio_util::sync::CancellationToken::new();
        let renewal = tokio::spawn({
            let (lease, lost) = (lease.clone(), lost.clone());
            async move {
                loop {
                    tokio::time::sleep(MOVE_LOCK_TTL / 3).await;
                    if !matches!(lease.renew(epoch).await, Ok(true)) {
                        lost.cancel();
                        return;
                    }
                }
            }
        });
        Ok(Ok(MoveLock { lease, epoch, renewal, lost }))
    }

    /// Fails once the lock was lost (this command paused past its life, and another took it).
    pub(super) fn check(&self) -> Result<(), CutoverError> {
        if self.lost.is_cancelled() {
            return Err(CutoverError::State(format!(
                "lost the move lock (this command was paused or cut off for over {}s); another command may be driving the move now",
                MOVE_LOCK_TTL.as_secs()
            )));
        }
        Ok(())
    }

    pub(crate) async fn release(self) {
        self.renewal.abort();
        let _ = self.lease.release(self.epoch).await;
    }
}
