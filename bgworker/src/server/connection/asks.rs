//! What a connection has asked the worker's main thread and not heard back
//! about: each question is a future in [`Asks`], polled by the connection's
//! loop beside its socket, so no answer is ever waited for in line.

use crate::server::errors::{AskError, AuthorizeError, SubscribeError};
use crate::server::link::{Authorize, MainLink, MainRequest, Permissions, Question, Subscribe};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, Stream};
use futures_util::FutureExt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

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
    Read(Result<Permissions, AuthorizeError>),
    /// Is the postgres_changes subscription in place?
    Subscribed(Result<(), SubscribeError>),
    /// May it broadcast (`broadcast`) or track presence (`presence`) on
    /// the private topic?
    Write(&'static str, Result<bool, AuthorizeError>),
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
        request: impl FnOnce(oneshot::Sender<Result<(), SubscribeError>>) -> Subscribe,
    ) {
        let (reply, answer) = oneshot::channel();
        let sent = main.map(|m| m.send(MainRequest::Subscribe(request(reply))));
        self.push(asker, sent, answer, Reply::Subscribed);
    }

    /// Asks the main thread what the channel's identity may do on its
    /// private topic.
    pub fn authorize(
        &mut self,
        main: Option<&MainLink>,
        asker: Asker,
        request: impl FnOnce(oneshot::Sender<Result<Permissions, AuthorizeError>>) -> Authorize,
    ) {
        let (reply, answer) = oneshot::channel();
        let question = {
            let request = request(reply);
            let question = request.question;
            let sent = main.map(|m| m.send(MainRequest::Authorize(request)));
            (question, sent)
        };
        match question.0 {
            Question::Read => self.push(asker, question.1, answer, Reply::Read),
            Question::Write(extension) => self.push(asker, question.1, answer, move |r| {
                Reply::Write(
                    extension,
                    r.map(|p| {
                        if extension == "presence" {
                            p.presence
                        } else {
                            p.broadcast
                        }
                    }),
                )
            }),
        }
    }

    /// Waits for `answer` (if the question was `sent`: None without a
    /// worker, false when it is gone) at most `timeout`.
    fn push<T: Send + 'static, E: AskError>(
        &mut self,
        asker: Asker,
        sent: Option<bool>,
        answer: oneshot::Receiver<Result<T, E>>,
        reply: impl FnOnce(Result<T, E>) -> Reply + Send + 'static,
    ) {
        let timeout = self.timeout;
        let future = async move {
            let result = match sent {
                None => Err(E::no_worker()),
                Some(false) => Err(E::no_database()),
                Some(true) => match tokio::time::timeout(timeout, answer).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(E::no_database()),
                    Err(_) => Err(E::timed_out(timeout.as_millis())),
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
