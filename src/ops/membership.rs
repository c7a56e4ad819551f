//! One consumer-group member's life, written once for every role that consumes in a group (a
//! service's consumer, its write-back consumer, the archive): claim this process's slot in the
//! registry ([`super::presence`]), join, work beside the keeper that watches the member, then
//! commit and leave; and the loop that starts a fresh member when the keeper calls for one
//! (counting fresh members in a row that held nothing, each waiting longer before giving way),
//! retrying a member that failed transiently with backoff.

use std::fmt::Display;
use std::future::Future;

use tokio_util::sync::CancellationToken;

use super::presence::{PresenceError, Slot};
use super::{Health, RoleId};
use crate::bus::GroupConsumer;
use crate::config::{KafkaConfig, Membership};
use crate::retry::{Classify, with_backoff};

/// Runs a role's group members one after another until shutdown or a fatal error. `member`
/// (given how many fresh members in a row came before) is one member's life; while it fails
/// transiently it is tried again with backoff (the role reported disconnected meanwhile).
pub async fn run_members<E, F, Fut>(
    role: &RoleId,
    health: &Health,
    shutdown: &CancellationToken,
    member: F,
) -> Result<(), E>
where
    E: Classify + Display,
    F: Fn(u32) -> Fut,
    Fut: Future<Output = Result<Ended, E>>,
{
    let mut rejoins = 0;
    loop {
        let attempt = || async {
            let r = member(rejoins).await;
            if r.is_err() {
                health.disconnected(role);
            }
            r
        };
        match with_backoff(&role.to_string(), shutdown, attempt, |e: &E| e.is_transient()).await? {
            Ended::Stopped => return Ok(()),
            Ended::Rejoin { held } => rejoins = if held { 0 } else { rejoins + 1 },
        }
    }
}

/// Claims this process's slot in `group` in the store's registry (see `presence`): the slot
/// `kafka.instance_id` with static membership, a per-process one with dynamic membership.
/// `None` when shutdown came first.
pub async fn claim_slot(
    store: &mongodb::Database,
    kafka: &KafkaConfig,
    group: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Slot>, PresenceError> {
    let instance = match kafka.membership {
        Membership::Static => kafka.instance_id.clone(),
        Membership::Dynamic => format!("{}#{}", kafka.instance_id, std::process::id()),
    };
    Slot::claim(store, group, &instance, shutdown).await
}

/// How one member's life in its group ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown: the role is done.
    Stopped,
    /// Its keeper called for a fresh member; `held`: whether this one ever held partitions.
    Rejoin { held: bool },
}

/// One member of a group at work: its keeper beside the work, and the close after it.
pub struct Life<'a> {
    pub slot: &'a Slot,
    pub consumer: &'a GroupConsumer,
    pub role: &'a RoleId,
    pub health: &'a Health,
    /// Fresh members in a row before this one (each waits longer before giving way).
    pub rejoins: u32,
}

impl Life<'_> {
    /// Runs `work` with a token that ends it (at its next batch) on shutdown or when the keeper
    /// calls for a fresh member; then commits what was stored and leaves, saying so when the
    /// commit could not be made (nothing is lost: the next member applies those messages again).
    /// Another process taking the slot ends the work at once.
    pub async fn run<E, F, Fut>(self, shutdown: &CancellationToken, work: F) -> Result<Ended, E>
    where
        E: From<PresenceError>,
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let member = shutdown.child_token();
        let limits = super::presence::LIMITS.after(self.rejoins);
        let (slot, consumer, role, health) =
            (self.slot.clone(), self.consumer.clone(), self.role.clone(), self.health.clone());
        let mut keeper = tokio::spawn(super::presence::keep(slot, consumer, role, health, limits, member.clone()));
        let work = work(member.clone());
        tokio::pin!(work);
        let (mut end, mut kept) = (None, false);
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                k = &mut keeper, if !kept => {
                    kept = true;
                    match k {
                        Ok(Err(conflict)) => break Err(PresenceError::from(conflict).into()),
                        // A fresh member called for (the work ends at its next batch), or shutdown.
                        Ok(Ok(e)) => end = Some(e),
                        // The keeper panicked: the work decides.
                        Err(_) => {}
                    }
                }
            }
        };
        if !kept {
            keeper.abort();
        }
        member.cancel();
        // Commit whatever was stored, whether stopping cleanly, for a fresh member, or on an error.
        let committed = self.consumer.close().await;
        if !committed {
            tracing::warn!(
                group = %self.consumer.group(),
                "the offsets of its last batches could not be committed; the group's next member applies those \
                 messages again (a no-op by version)"
            );
        }
        if shutdown.is_cancelled() {
            self.slot.release().await;
        }
        result?;
        match end.and_then(|e| e.rejoin.map(|_| e.held)) {
            Some(held) if !shutdown.is_cancelled() => Ok(Ended::Rejoin { held }),
            _ => Ok(Ended::Stopped),
        }
    }
}
