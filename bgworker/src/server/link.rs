//! Requests from network threads to the worker's main thread, which alone
//! may read the catalog and owns the subscription registry. Each request is
//! queued, then the main thread is woken through the wake-up socket.

use super::fanout::FanoutSender;
use crate::changes::registry::ChannelKey;
use crate::server::errors::{AuthorizeError, SubscribeError};
use crate::server::join::PostgresChangesBinding;
use crate::server::jwt::Claims;
use crate::server::wake::Waker;
use tokio::sync::oneshot;

/// The network side's handle on the main thread.
#[derive(Clone)]
pub struct MainLink {
    tx: crossbeam_channel::Sender<MainRequest>,
    waker: Waker,
}

/// The main thread's end.
pub type MainReceiver = crossbeam_channel::Receiver<MainRequest>;

/// A link and its receiving end.
pub fn main_link(waker: Waker) -> (MainLink, MainReceiver) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (MainLink { tx, waker }, rx)
}

impl MainLink {
    /// Queues a request and wakes the main thread. False if the main thread
    /// is gone.
    pub fn send(&self, request: MainRequest) -> bool {
        let sent = self.tx.send(request).is_ok();
        self.waker.wake();
        sent
    }
}

pub enum MainRequest {
    /// Validate a channel's `postgres_changes` bindings against the catalog
    /// and start delivering; reply once events flow (or why they cannot).
    Subscribe(Subscribe),
    /// The channel left or its connection closed.
    Unsubscribe(ChannelKey),
    /// A private channel's permissions, from the policies on
    /// `realtime.messages` (`docs/protocol.md`, "Private channels").
    Authorize(Authorize),
}

/// What a private channel asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    /// May the identity read the topic's broadcasts and presence (at join,
    /// and again after a token refresh)?
    Read,
    /// May it send a broadcast (`broadcast`) or track presence
    /// (`presence`)? Asked lazily, on the first one.
    Write(&'static str),
}

/// The answer: which extensions the identity may read (for `Read`), or
/// whether it may write (for `Write`, in `broadcast`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions {
    pub broadcast: bool,
    pub presence: bool,
}

pub struct Authorize {
    /// The topic without `realtime:`, which `realtime.topic()` returns.
    pub subtopic: String,
    pub claims: Claims,
    pub question: Question,
    /// `Err` is why the permissions are not known, for the client.
    pub reply: oneshot::Sender<Result<Permissions, AuthorizeError>>,
}

/// A channel's `postgres_changes` subscription.
pub struct Subscribe {
    pub key: ChannelKey,
    /// The topic without `realtime:`, for messages.
    pub subtopic: String,
    /// The client's entries with the ids the join reply gives them.
    pub bindings: Vec<(u32, PostgresChangesBinding)>,
    pub claims: Claims,
    /// Where the channel's events go.
    pub sink: FanoutSender,
    /// `Err` is the `system` error for the client.
    pub reply: oneshot::Sender<Result<(), SubscribeError>>,
}
