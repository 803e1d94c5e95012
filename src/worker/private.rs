//! Private channels on the main thread: what an identity may do on a topic,
//! from the row-level security policies on `realtime.messages`
//! (`docs/protocol.md`, "Private channels"). Probe rows are inserted by the worker and
//! selected back, or inserted, as the subscriber in its restricted context
//! (`acting`); everything is rolled back, so no row is ever kept.

use super::acting::{self, Identity};
use super::catalog::{self, CatalogResult};
use bgworker::server::errors::AuthorizeError;
use bgworker::server::link::{Authorize, Permissions, Question};
use pgrx::bgworkers::BackgroundWorker;

/// Answers a network thread's question about a private channel.
pub fn authorize(request: Authorize) {
    let Authorize {
        subtopic,
        claims,
        question,
        reply,
    } = request;
    let claims_json = claims.json.clone();
    let answer = BackgroundWorker::transaction(|| {
        let answer = catalog::catching(|| answer(&claims, &claims_json, &subtopic, question));
        let _ = catalog::release_session_locks();
        answer.and_then(|a| a)
    });
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            pgrx::warning!(
                "pg_realtime: could not check a private channel's permissions: {}",
                bgworker::server::log::escape(&e.to_string())
            );
            Err(AuthorizeError::NoDatabase)
        }
    };
    let _ = reply.send(answer);
}

/// The answer to `question` for the claims on the topic: `Ok(Err)` is a
/// refusal for the client, `Err` the database's failure.
fn answer(
    claims: &bgworker::server::jwt::Claims,
    claims_json: &str,
    subtopic: &str,
    question: Question,
) -> CatalogResult<Result<Permissions, AuthorizeError>> {
    if let Some(why) = acting::refused(bgworker::shared::quarantine::PRIVATE_PROBES) {
        return Ok(Err(AuthorizeError::Refused(why)));
    }
    let role = match acting::resolve(&claims.role)? {
        Ok(role) => role,
        Err(refusal) => return Ok(Err(refusal.into())),
    };
    let identity = Identity {
        role,
        role_name: &claims.role,
        claims: claims_json,
        sub: claims.sub.as_deref(),
        topic: Some(subtopic),
        subject: bgworker::shared::quarantine::PRIVATE_PROBES,
    };
    Ok(Ok(match question {
        Question::Read => read(&identity, subtopic)?,
        Question::Write(extension) => {
            let ok = acting::as_identity(&identity, || catalog::insert_message(subtopic, extension)).is_ok();
            Permissions {
                broadcast: ok,
                presence: ok,
            }
        }
    }))
}

/// Which extensions the identity may read on the topic. An error while
/// acting as it (no privilege on the table, a policy that raises) is a
/// denial; an error inserting the probes is the database's.
fn read(identity: &Identity<'_>, subtopic: &str) -> CatalogResult<Permissions> {
    let seen = catalog::rolled_back(|| {
        let ids = catalog::insert_probes(subtopic)?;
        Ok::<_, pgrx::spi::Error>(acting::as_identity(identity, || catalog::visible_probes(&ids)).unwrap_or_default())
    })??;
    Ok(Permissions {
        broadcast: seen.iter().any(|e| e == "broadcast"),
        presence: seen.iter().any(|e| e == "presence"),
    })
}
