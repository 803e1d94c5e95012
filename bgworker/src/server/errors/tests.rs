use super::*;
use serde_json::Map;

fn binding(schema: Option<&str>, table: Option<&str>, filter: Option<&str>) -> PostgresChangesBinding {
    PostgresChangesBinding {
        raw: Map::new(),
        event: "*".into(),
        schema: schema.map(Into::into),
        table: table.map(Into::into),
        filter: filter.map(Into::into),
        select: None,
    }
}

#[test]
fn subscribe_errors_read_as_supabase_writes_them() {
    let params = Params::of(&binding(Some("public"), Some("x"), None));
    assert_eq!(
        SubscribeError::NotPublished(params.clone()).to_string(),
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given \
         connect parameters: [event: *, schema: public, table: x, filters: [], select: nil]"
    );
    let invalid = SubscribeError::Invalid {
        params: Params::of(&binding(Some("public"), Some("x"), Some("nope=eq.1"))),
        problem: BindingProblem::NoSuchColumn("nope".into()),
    };
    assert_eq!(
        invalid.to_string(),
        "Unable to subscribe to changes with given parameters. An exception happened so please check your connect \
         parameters: [event: *, schema: public, table: x, filters: [nope=eq.1], select: nil]. Exception: invalid \
         column for filter nope"
    );
    assert_eq!(
        SubscribeError::NoTarget(Params::of(&binding(None, None, None))).to_string(),
        "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: \
         [event: *, schema: nil, table: nil, filters: [], select: nil]"
    );
    assert_eq!(
        SubscribeError::TimedOut(8000).to_string(),
        "Timed out after 8000ms waiting for the postgres_changes subscription"
    );
    assert_eq!(
        SubscribeError::NoDatabase.to_string(),
        "Realtime was unable to connect to the project database"
    );
}

#[test]
fn problems_and_limits_say_what_and_where() {
    let cases = [
        (
            BindingProblem::NoSuchTable {
                schema: "public".into(),
                table: "gone".into(),
            },
            "relation \"public.gone\" does not exist",
        ),
        (
            BindingProblem::CannotSelect {
                role: "anon".into(),
                schema: "public".into(),
                table: "t".into(),
            },
            "permission denied: role \"anon\" cannot SELECT from \"public.t\"",
        ),
        (
            BindingProblem::CannotSelectColumn {
                role: "anon".into(),
                column: "secret".into(),
                table: "public.t".into(),
            },
            "permission denied: role \"anon\" cannot SELECT column secret of \"public.t\"",
        ),
        (
            BindingProblem::NotOrdered {
                column: "doc".into(),
                typname: "jsonb".into(),
            },
            "filter on doc of type jsonb: only eq, neq and in are supported",
        ),
        (
            BindingProblem::InvalidValue {
                column: "id".into(),
                why: "invalid input syntax for type bigint: \"x\"".into(),
            },
            "invalid value for filter id: invalid input syntax for type bigint: \"x\"",
        ),
    ];
    for (problem, text) in cases {
        assert_eq!(problem.to_string(), text);
    }
    let over = SubscribeError::from(OverLimit::FilterBytes { bytes: 5000, max: 4096 });
    assert_eq!(
        over.to_string(),
        "Unable to subscribe to changes with given parameters: a filter of 5000 bytes, more than \
         pg_realtime.max_filter_bytes (4096)"
    );
}

#[test]
fn role_refusals_pass_through_unchanged() {
    let refusal = RoleRefusal::Superuser("postgres".into());
    let text = "Unauthorized: role \"postgres\" of the token may not be used: it is a superuser";
    assert_eq!(SubscribeError::from(refusal.clone()).to_string(), text);
    assert_eq!(AuthorizeError::from(refusal).to_string(), text);
}

#[test]
fn authorize_errors_read_as_supabase_writes_them() {
    assert_eq!(
        AuthorizeError::TimedOut.to_string(),
        "Query was cancelled, please try again"
    );
    assert_eq!(
        AuthorizeError::no_database().to_string(),
        "Realtime was unable to connect to the project database"
    );
    // without a worker there is no database to ask either
    assert_eq!(AuthorizeError::no_worker(), AuthorizeError::NoDatabase);
    assert_eq!(
        <SubscribeError as AskError>::timed_out(10),
        SubscribeError::TimedOut(10)
    );
}

#[test]
fn join_refusals_carry_their_codes() {
    assert_eq!(
        JoinRefusal::TopicNameRequired.to_string(),
        "TopicNameRequired: You must provide a topic name"
    );
    assert_eq!(
        JoinRefusal::TooManyChannels.to_string(),
        "ChannelRateLimitReached: Too many channels"
    );
    let token = JoinRefusal::from(AuthError::Malformed);
    assert_eq!(token.to_string(), AuthError::Malformed.join_reason());
    assert!(token.to_string().starts_with("MalformedJWT"));
}
