//! What a connection has asked the worker's main thread and not heard back
//! about: each question is a future in [`Asks`], polled by the connection's
//! loop beside its socket, so no answer is ever waited for in line.

use super::super::link::{Authorize, MainLink, MainRequest, Permissions, Question, Subscribe};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, Stream};
use futures_util::FutureExt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

/// What the client hears when the main thread cannot answer.
pub const NO_DATABASE: &str = "Realtime was unable to connect to the project database";

/// Why a channel asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// To finish its join.
    Join,
    /// After its token changed.
    Refresh,
}

#[derive(Debug)]
pub enum Reply {
    /// May the identity read the private topic (`Question::Read`)?
    Read(Result<Permissions, String>),
    /// Is the postgres_changes subscription in place?
    Subscribed(Result<(), String>),
    /// May it broadcast on the private topic?
    Write(Result<bool, String>),
}

/// An answer, with what it is about: the channel (topic and join), the
/// identity it was asked for, and why.
#[derive(Debug)]
pub struct Answer {
    pub topic: String,
    pub join: u64,
    pub identity: u64,
    pub stage: Stage,
    pub reply: Reply,
}

/// Who asks, for the answer to say.
pub struct Asker {
    pub topic: String,
    pub join: u64,
    pub identity: u64,
    pub stage: Stage,
}

/// The questions in flight, each waiting at most `timeout` (`Options::ask_timeout`).
pub struct Asks {
    pending: FuturesUnordered<BoxFuture<'static, Answer>>,
    timeout: Duration,
}

impl Asks {
    pub fn new(timeout: Duration) -> Asks {
        Asks {
            pending: FuturesUnordered::new(),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Asks the main thread to subscribe a channel's bindings.
    pub fn subscribe(
        &mut self,
        main: Option<&MainLink>,
        asker: Asker,
        request: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Subscribe,
    ) {
        let (reply, answer) = oneshot::channel();
        let sent = main.map(|m| m.send(MainRequest::Subscribe(request(reply))));
        let timed_out = format!(
            "Timed out after {}ms waiting for the postgres_changes subscription",
            self.timeout.as_millis()
        );
        let unavailable = main
            .is_none()
            .then(|| "postgres_changes is not available: the server runs without a database".to_owned());
        self.push(asker, sent, unavailable, answer, timed_out, Reply::Subscribed);
    }

    /// Asks the main thread what the channel's identity may do on its
    /// private topic.
    pub fn authorize(
        &mut self,
        main: Option<&MainLink>,
        asker: Asker,
        request: impl FnOnce(oneshot::Sender<Result<Permissions, String>>) -> Authorize,
    ) {
        let (reply, answer) = oneshot::channel();
        let question = {
            let request = request(reply);
            let question = request.question;
            let sent = main.map(|m| m.send(MainRequest::Authorize(request)));
            (question, sent)
        };
        let timed_out = "Query was cancelled, please try again".to_owned();
        match question.0 {
            Question::Read => self.push(asker, question.1, None, answer, timed_out, Reply::Read),
            Question::Write(_) => self.push(asker, question.1, None, answer, timed_out, |r| {
                Reply::Write(r.map(|p| p.broadcast))
            }),
        }
    }

    fn push<T: Send + 'static>(
        &mut self,
        asker: Asker,
        sent: Option<bool>,
        unavailable: Option<String>,
        answer: oneshot::Receiver<Result<T, String>>,
        timed_out: String,
        reply: impl FnOnce(Result<T, String>) -> Reply + Send + 'static,
    ) {
        let timeout = self.timeout;
        let future = async move {
            let result = match sent {
                None => Err(unavailable.unwrap_or_else(|| NO_DATABASE.to_owned())),
                Some(false) => Err(NO_DATABASE.to_owned()),
                Some(true) => match tokio::time::timeout(timeout, answer).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(NO_DATABASE.to_owned()),
                    Err(_) => Err(timed_out),
                },
            };
            Answer {
                topic: asker.topic,
                join: asker.join,
                identity: asker.identity,
                stage: asker.stage,
                reply: reply(result),
            }
        };
        self.pending.push(future.boxed());
    }
}

impl Stream for Asks {
    type Item = Answer;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Answer>> {
        Pin::new(&mut self.pending).poll_next(cx)
    }
}
