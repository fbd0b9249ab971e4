//! The life of one relayed flow between two ends (`Side::Server`: the connecting
//! server's side, `Side::Client`: the agent's side), as the relaying shell sees
//! it. The shell reports what happened on each end; the machine answers with what
//! to do to the other end so that TCP semantics survive the relay: half-close
//! travels one way at a time, a reset on one end resets the other, an open that
//! gets no answer is refused in bounded time, and an idle flow is cut.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Server => Side::Client,
            Side::Client => Side::Server,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowPhase {
    /// waiting for the far end's reply; the server may already have sent (and
    /// finished sending) data, which travels ahead of the reply (pipelining)
    Opening { server_done: bool },
    /// bytes flow; each flag says that side has sent its FIN
    Open { server_done: bool, client_done: bool },
    /// both directions finished cleanly
    Closed,
    /// torn down by a reset, a refusal or a timeout
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    /// the far end accepted the flow
    Accepted,
    /// the far end refused it
    Refused,
    /// bytes arrived from a side
    Data(Side),
    /// a side finished sending (FIN)
    Eof(Side),
    /// a side reset its connection (or its stream broke)
    Reset(Side),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowAction {
    /// finish (half-close) the writing half towards this side
    Finish(Side),
    /// reset this side
    Reset(Side),
    /// the flow is over; release its resources
    Done,
}

#[derive(Clone, Debug)]
pub struct Flow {
    phase: FlowPhase,
    open_timeout: Duration,
    idle_timeout: Duration,
    started: Instant,
    last_activity: Instant,
}

impl Flow {
    pub fn new(now: Instant, open_timeout: Duration, idle_timeout: Duration) -> Self {
        Flow { phase: FlowPhase::Opening { server_done: false }, open_timeout, idle_timeout, started: now, last_activity: now }
    }

    pub fn phase(&self) -> FlowPhase {
        self.phase
    }

    pub fn is_over(&self) -> bool {
        matches!(self.phase, FlowPhase::Closed | FlowPhase::Aborted)
    }

    /// Feeds one event; returns the actions to carry out, in order.
    pub fn handle(&mut self, event: FlowEvent, now: Instant) -> Vec<FlowAction> {
        self.last_activity = self.last_activity.max(now);
        match (self.phase, event) {
            (FlowPhase::Closed | FlowPhase::Aborted, _) => Vec::new(),
            (FlowPhase::Opening { server_done }, FlowEvent::Accepted) => {
                self.phase = FlowPhase::Open { server_done, client_done: false };
                Vec::new()
            }
            (FlowPhase::Opening { .. }, FlowEvent::Refused) => self.abort(vec![FlowAction::Reset(Side::Server)]),
            (FlowPhase::Opening { server_done: false }, FlowEvent::Eof(Side::Server)) => {
                // the server finished sending before the answer came: pass the FIN on
                self.phase = FlowPhase::Opening { server_done: true };
                vec![FlowAction::Finish(Side::Client)]
            }
            (FlowPhase::Opening { server_done: true }, FlowEvent::Eof(Side::Server)) => Vec::new(),
            (FlowPhase::Opening { .. }, FlowEvent::Reset(side)) => self.abort(vec![FlowAction::Reset(side.other())]),
            // the far end went away without answering
            (FlowPhase::Opening { .. }, FlowEvent::Eof(Side::Client)) => self.abort(vec![FlowAction::Reset(Side::Server)]),
            (FlowPhase::Opening { .. }, FlowEvent::Data(_)) => Vec::new(),
            (FlowPhase::Open { .. }, FlowEvent::Accepted | FlowEvent::Refused) => Vec::new(),
            (FlowPhase::Open { .. }, FlowEvent::Data(_)) => Vec::new(),
            (FlowPhase::Open { .. }, FlowEvent::Reset(side)) => self.abort(vec![FlowAction::Reset(side.other())]),
            (FlowPhase::Open { server_done, client_done }, FlowEvent::Eof(side)) => {
                let (server_done, client_done) = match side {
                    Side::Server if !server_done => (true, client_done),
                    Side::Client if !client_done => (server_done, true),
                    _ => return Vec::new(),
                };
                let mut actions = vec![FlowAction::Finish(side.other())];
                if server_done && client_done {
                    self.phase = FlowPhase::Closed;
                    actions.push(FlowAction::Done);
                } else {
                    self.phase = FlowPhase::Open { server_done, client_done };
                }
                actions
            }
        }
    }

    /// When [`Flow::handle_timeout`] must run next; `None` once the flow is over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            FlowPhase::Opening { .. } => Some(self.started + self.open_timeout),
            FlowPhase::Open { .. } => Some(self.last_activity + self.idle_timeout),
            FlowPhase::Closed | FlowPhase::Aborted => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Vec<FlowAction> {
        match self.poll_timeout() {
            // an open nobody answered and an idle flow end the same way: both sides reset
            Some(deadline) if now >= deadline => self.abort(vec![FlowAction::Reset(Side::Server), FlowAction::Reset(Side::Client)]),
            _ => Vec::new(),
        }
    }

    fn abort(&mut self, mut actions: Vec<FlowAction>) -> Vec<FlowAction> {
        self.phase = FlowPhase::Aborted;
        actions.push(FlowAction::Done);
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FlowAction::{Done, Finish};
    use FlowEvent::{Accepted, Data, Eof, Refused};
    use Side::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn flow(start: Instant) -> Flow {
        Flow::new(start, 5 * SECOND, 60 * SECOND)
    }

    #[test]
    fn half_close_travels_each_way_then_the_flow_ends() {
        let start = Instant::now();
        let mut flow = flow(start);
        assert_eq!(flow.handle(Accepted, start), vec![]);
        assert_eq!(flow.handle(Data(Server), start), vec![]);
        assert_eq!(flow.handle(Eof(Server), start), vec![Finish(Client)]);
        assert_eq!(flow.phase(), FlowPhase::Open { server_done: true, client_done: false });
        // the client keeps sending after the server's FIN
        assert_eq!(flow.handle(Data(Client), start + SECOND), vec![]);
        assert_eq!(flow.handle(Eof(Server), start + SECOND), vec![], "a repeated EOF is ignored");
        assert_eq!(flow.handle(Eof(Client), start + 2 * SECOND), vec![Finish(Server), Done]);
        assert_eq!(flow.phase(), FlowPhase::Closed);
        assert_eq!(flow.poll_timeout(), None);
    }

    #[test]
    fn a_reset_on_either_end_resets_the_other() {
        let start = Instant::now();
        for side in [Server, Client] {
            let mut flow = flow(start);
            flow.handle(Accepted, start);
            flow.handle(Eof(Server), start);
            assert_eq!(flow.handle(FlowEvent::Reset(side), start), vec![FlowAction::Reset(side.other()), Done]);
            assert!(flow.is_over());
            assert_eq!(flow.handle(Data(side), start), vec![]);
        }
    }

    #[test]
    fn refusal_and_open_timeout_reset_the_server() {
        let start = Instant::now();
        let mut refused = flow(start);
        assert_eq!(refused.handle(Refused, start), vec![FlowAction::Reset(Server), Done]);
        let mut silent = flow(start);
        assert_eq!(silent.poll_timeout(), Some(start + 5 * SECOND));
        assert_eq!(silent.handle_timeout(start + 4 * SECOND), vec![]);
        assert_eq!(silent.handle_timeout(start + 5 * SECOND), vec![FlowAction::Reset(Server), FlowAction::Reset(Client), Done]);
        let mut vanished = flow(start);
        assert_eq!(vanished.handle(Eof(Client), start), vec![FlowAction::Reset(Server), Done], "the far end left without answering");
        let mut abandoned = flow(start);
        assert_eq!(abandoned.handle(FlowEvent::Reset(Server), start), vec![FlowAction::Reset(Client), Done]);
    }

    #[test]
    fn data_and_fin_sent_before_the_answer_travel_ahead_of_it() {
        let start = Instant::now();
        let mut flow = flow(start);
        assert_eq!(flow.handle(Data(Server), start), vec![]);
        assert_eq!(flow.handle(Eof(Server), start), vec![Finish(Client)]);
        assert_eq!(flow.handle(Eof(Server), start), vec![]);
        assert_eq!(flow.handle(Accepted, start), vec![]);
        assert_eq!(flow.phase(), FlowPhase::Open { server_done: true, client_done: false });
        assert_eq!(flow.handle(Eof(Client), start), vec![Finish(Server), Done]);
    }

    #[test]
    fn idle_flows_time_out_and_traffic_keeps_them_alive() {
        let start = Instant::now();
        let mut flow = flow(start);
        flow.handle(Accepted, start);
        flow.handle(Data(Client), start + 50 * SECOND);
        assert_eq!(flow.handle_timeout(start + 60 * SECOND), vec![]);
        assert_eq!(flow.poll_timeout(), Some(start + 110 * SECOND));
        assert_eq!(flow.handle_timeout(start + 110 * SECOND), vec![FlowAction::Reset(Server), FlowAction::Reset(Client), Done]);
    }
}
