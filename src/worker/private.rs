//! Private channels on the main thread: what an identity may do on a topic,
//! from the row-level security policies on `realtime.messages`
//! (`realtime-protocol.md` §6.4). Every probe runs in a subtransaction that
//! is rolled back, so no row is ever kept.

use super::catalog;
use pgrx::bgworkers::BackgroundWorker;
use realtime::server::link::{Authorize, Permissions, Question};

/// Answers a network thread's question about a private channel.
pub fn authorize(request: Authorize) {
    let Authorize {
        subtopic,
        claims,
        question,
        reply,
    } = request;
    let claims_json = serde_json::Value::Object(claims.all.clone()).to_string();
    let identity = catalog::Identity {
        role: &claims.role,
        claims: &claims_json,
        sub: claims.sub.as_deref(),
        topic: Some(&subtopic),
    };
    let answer = BackgroundWorker::transaction(|| {
        catalog::rolled_back(|| match question {
            Question::Read => {
                catalog::readable_extensions(&identity).map(|(broadcast, presence)| Permissions { broadcast, presence })
            }
            Question::Write(extension) => catalog::writable(&identity, extension).map(|ok| Permissions {
                broadcast: ok,
                presence: ok,
            }),
        })
    });
    let answer = match answer.and_then(|inner| inner.map_err(|e| e.to_string())) {
        Ok(permissions) => Ok(permissions),
        Err(e) => {
            pgrx::warning!("pg_realtime: could not check a private channel's permissions: {e}");
            Err("Realtime was unable to connect to the project database".to_owned())
        }
    };
    let _ = reply.send(answer);
}
