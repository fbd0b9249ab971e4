//! The enrollment writer: one task that takes enrollments off a queue and writes
//! them in batches (group commit) through the allocation service, which holds the
//! allocation engine while each batch is written.

use reachback_store::{EnrollFailure, EnrollJob, EnrollOutcome};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::state::AppState;

/// One queued enrollment and where to send its result.
pub struct EnrollRequest {
    pub job: EnrollJob,
    pub reply: oneshot::Sender<Result<Result<EnrollOutcome, EnrollFailure>, ApiError>>,
}

const MAX_BATCH: usize = 512;

/// Starts the writer on a thread of its own with a single-threaded runtime: every
/// statement of a batch is an await, and on the shared runtime each wake-up would
/// queue behind the HTTP tasks (tens of them under load) — the batch, and with it
/// every enrollment waiting on it, would take that many times longer. The receiver
/// resolves when the writer has finished.
pub fn spawn(state: std::sync::Weak<AppState>, queue: mpsc::Receiver<EnrollRequest>) -> std::io::Result<oneshot::Receiver<()>> {
    let (done, finished) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("reachback-writer".into()).spawn(move || {
        runtime.block_on(run(state, queue));
        let _ = done.send(());
    })?;
    Ok(finished)
}

/// Runs until every sender is gone (server shutdown). Holds the state weakly, so
/// dropping the last server handle closes the queue.
pub async fn run(state: std::sync::Weak<AppState>, mut queue: mpsc::Receiver<EnrollRequest>) {
    let mut batch: Vec<EnrollRequest> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let Some(state) = state.upgrade() else {
            for request in batch.drain(..) {
                let _ = request.reply.send(Err(ApiError::unavailable("the server is shutting down")));
            }
            continue;
        };
        let (jobs, replies): (Vec<EnrollJob>, Vec<_>) = batch.drain(..).map(|request| (request.job, request.reply)).unzip();
        let quarantine = state.settings().quarantine_micros();
        let started = std::time::Instant::now();
        let result = state.allocation.enroll_batch(&jobs, quarantine).await;
        state.metrics.enroll_batch_size.observe(jobs.len() as f64);
        state.metrics.enroll_batch_seconds.observe(started.elapsed().as_secs_f64());
        tracing::trace!(size = jobs.len(), "enrollment batch written");
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                let error = ApiError::from(error);
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
