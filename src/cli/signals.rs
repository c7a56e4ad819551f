//! SIGTERM and SIGINT, heard on a thread of their own.
//!
//! The first signal cancels the shutdown token: every role drains and checkpoints. A second
//! signal exits at once (status 1), naming what was still running; so does the hard bound, when
//! the process is still running that long after the first (a drain the supervisor's own deadline
//! could not end). The listener runs on its own thread with a runtime of its own, so it hears a
//! signal however busy, or held, the main runtime's workers are: with every worker held by a
//! call into a broker that was gone, `ficus run` once ignored SIGTERM for 25 minutes (issue 19).

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::daemon::Running;

/// Listens for SIGTERM and SIGINT (see the module header). `bound`: how long after the first
/// signal the process may still run before it exits by itself; `None` for no bound.
pub(super) fn watch(shutdown: CancellationToken, bound: Option<Duration>, running: Running) {
    let spawned = std::thread::Builder::new().name("ficus-signals".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                error!("cannot listen for signals: {e}");
                return;
            }
        };
        rt.block_on(listen(shutdown, bound, running));
    });
    if let Err(e) = spawned {
        error!("cannot start the signal listener: {e}");
    }
}

async fn listen(shutdown: CancellationToken, bound: Option<Duration>, running: Running) {
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error!("cannot listen for SIGTERM and SIGINT: {e}");
            return;
        }
    };
    let first = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    match bound {
        Some(b) => info!("{first}: draining (at most {}s); a second signal exits at once", b.as_secs()),
        None => info!("{first}: draining; a second signal exits at once"),
    }
    shutdown.cancel();
    let deadline = async {
        match bound {
            Some(b) => tokio::time::sleep(b).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => exit_now("a second signal", &running),
        _ = int.recv() => exit_now("a second signal", &running),
        _ = deadline => exit_now("the shutdown bound", &running),
    }
}

fn exit_now(why: &str, running: &Running) -> ! {
    error!("{why}: exiting at once; abandoned what was still running: {}", running.describe());
    eprintln!("ficus: {why}: exiting at once; abandoned what was still running: {}", running.describe());
    std::process::exit(1)
}
