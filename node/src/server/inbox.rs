//! The compute thread's inbox: the jobs it takes, the handle others queue them with,
//! and the limit past which requests are refused as busy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use protocol::{SessionId, Step};
use shard::Span;

use super::compute::INBOX_LIMIT;
use crate::net::Inbound;

/// An open session whose client must move elsewhere: this server is leaving.
#[derive(Debug, Clone, Copy)]
pub struct Handover {
    /// Who opened it.
    pub client: PeerId,
    /// Its id here.
    pub session: SessionId,
    /// The step it would take next.
    pub next_step: u64,
}

/// Blocks `[start, end)` a session's cache covers.
pub(super) type BlockRange = (usize, usize);

/// Work for the compute thread.
pub enum Job {
    /// A request of the control plane (boxed, as the span below: jobs stay small).
    Request(Box<Inbound>),
    /// A step from the data plane.
    Step(Box<Step>),
    /// Serve this span from now on (rebalancing): every open session is dropped, and
    /// their clients fail over.
    Replace {
        /// The newly loaded span.
        span: Box<Span>,
        /// Its measured throughput.
        throughput: f32,
    },
    /// Announce again now (a peer that held our records may have left).
    Announce,
    /// Some peer's presence ended: drop the sessions of clients that are gone.
    Departed,
    /// Shut down gracefully: finish what is queued before this, then stop taking
    /// sessions and steps and answer with the sessions to hand over.
    Drain(tokio::sync::oneshot::Sender<Vec<Handover>>),
}

/// The compute thread's end of its channel: counts requests and steps out of the inbox
/// as it takes them (see [`ServerHandle::queued`]).
pub(super) struct Inbox {
    pub(super) rx: std_mpsc::Receiver<Job>,
    pub(super) queued: Arc<AtomicUsize>,
}

impl Inbox {
    pub(super) fn recv_timeout(&self, wait: Duration) -> Result<Job, std_mpsc::RecvTimeoutError> {
        self.rx.recv_timeout(wait).inspect(|j| self.took(j))
    }

    pub(super) fn try_recv(&self) -> Result<Job, std_mpsc::TryRecvError> {
        self.rx.try_recv().inspect(|j| self.took(j))
    }

    pub(super) fn took(&self, job: &Job) {
        if matches!(job, Job::Request(_) | Job::Step(_)) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A request or a step, as the compute thread handles them in arrival order.
pub(super) enum Work {
    Request(Inbound),
    Step(Step),
}

impl Work {
    /// The work in a job; `None` for the thread's own jobs.
    pub(super) fn of(job: Job) -> Option<Work> {
        match job {
            Job::Request(i) => Some(Work::Request(*i)),
            Job::Step(s) => Some(Work::Step(*s)),
            _ => None,
        }
    }
}

/// Sends work to the compute thread.
#[derive(Clone)]
pub struct ServerHandle {
    pub(super) tx: std_mpsc::Sender<Job>,
    /// Requests and steps in the inbox (see [`INBOX_LIMIT`]); the compute thread counts
    /// them down as it takes them.
    pub(super) queued: Arc<AtomicUsize>,
}

/// Why the compute thread did not take a request or step.
#[derive(Debug)]
pub enum Refused<T> {
    /// Its inbox is full ([`INBOX_LIMIT`]): the sender should be told the server is busy.
    /// The request comes back, to be answered.
    Busy(Box<T>),
    /// The compute thread has stopped.
    Stopped,
}

impl ServerHandle {
    /// Queues a control request for the compute thread.
    pub fn submit(&self, inbound: Inbound) -> Result<(), Refused<Inbound>> {
        if !self.reserve() {
            return Err(Refused::Busy(Box::new(inbound)));
        }
        self.send_counted(Job::Request(Box::new(inbound)))
    }

    /// Queues a step from the data plane for the compute thread.
    pub fn submit_step(&self, step: Step) -> Result<(), Refused<Step>> {
        if !self.reserve() {
            return Err(Refused::Busy(Box::new(step)));
        }
        self.send_counted(Job::Step(Box::new(step)))
    }

    /// Takes a place in the inbox; false if none is left.
    pub(super) fn reserve(&self) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < INBOX_LIMIT).then_some(n + 1)
            })
            .is_ok()
    }

    pub(super) fn send_counted<T>(&self, job: Job) -> Result<(), Refused<T>> {
        self.tx.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            Refused::Stopped
        })
    }

    /// Swaps in a new span; false if the thread has stopped.
    pub fn replace(&self, span: Span, throughput: f32) -> bool {
        self.tx
            .send(Job::Replace {
                span: Box::new(span),
                throughput,
            })
            .is_ok()
    }

    /// Drops the sessions of clients whose presence has ended; false if the thread has
    /// stopped.
    pub fn departed(&self) -> bool {
        self.tx.send(Job::Departed).is_ok()
    }

    /// Puts the announcement in the DHT again now; false if the thread has stopped.
    pub fn announce(&self) -> bool {
        self.tx.send(Job::Announce).is_ok()
    }

    /// Starts a graceful shutdown (see [`Job::Drain`]); `None` if the thread has
    /// stopped.
    pub fn drain(&self) -> Option<tokio::sync::oneshot::Receiver<Vec<Handover>>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Job::Drain(tx)).ok().map(|_| rx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc as std_mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    use protocol::{HiddenState, Step, WireDType};

    use super::{Inbox, Refused, ServerHandle, INBOX_LIMIT};

    fn step(i: u64) -> Step {
        Step {
            session: 1,
            step: i,
            position: i as u32,
            hidden: HiddenState::from_f32(&[0.5; 4], vec![1, 4], WireDType::F32),
            next: vec![],
            reply_to: String::new(),
        }
    }

    /// The inbox takes [`INBOX_LIMIT`] requests, refuses the next as busy (handing it
    /// back), takes one again once the compute thread has taken one out, and says so
    /// when the thread is gone.
    #[test]
    fn a_full_inbox_refuses_as_busy_until_the_thread_takes_work() {
        let (tx, rx) = std_mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let handle = ServerHandle {
            tx,
            queued: queued.clone(),
        };
        let inbox = Inbox { rx, queued };
        for i in 0..INBOX_LIMIT as u64 {
            assert!(handle.submit_step(step(i)).is_ok(), "step {i} refused");
        }
        match handle.submit_step(step(999)) {
            Err(Refused::Busy(s)) => assert_eq!(s.step, 999),
            other => panic!("a full inbox took a step: {other:?}"),
        }
        // The thread's own jobs are not counted against the limit.
        assert!(handle.announce());
        assert!(inbox.recv_timeout(Duration::from_secs(1)).is_ok());
        assert!(handle.submit_step(step(1000)).is_ok());
        assert!(matches!(
            handle.submit_step(step(1001)),
            Err(Refused::Busy(_))
        ));
        // Gone: the work comes back as stopped, and takes no place in the count.
        drop(inbox);
        let stopped = ServerHandle {
            tx: handle.tx.clone(),
            queued: Arc::new(AtomicUsize::new(0)),
        };
        assert!(matches!(
            stopped.submit_step(step(2000)),
            Err(Refused::Stopped)
        ));
        assert_eq!(stopped.queued.load(std::sync::atomic::Ordering::Acquire), 0);
    }
}
