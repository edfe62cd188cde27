//! Who may call the `AdminService` (holders of an admin token) and the `TimelineService` (holders
//! of a query token, when any is configured): the tokens' SHA-256 are in the configuration. A
//! partner's token is recognised and refused with PERMISSION_DENIED, so that a partner learns it
//! is authenticated but not allowed, rather than that its token is wrong.

use std::sync::Arc;

use subtle::ConstantTimeEq as _;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use touchline_ingest::auth::request_token;
use touchline_ingest::{PartnerDirectory, hash_token};
use touchline_query::admin::Authorize;

use crate::access::{AccessTokens, Lists};

/// The admin token `touchline dev` accepts when the configuration names none. Development only.
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";

/// A refused call of the `kind` service (`admin`, `query`), counted for the on-call.
fn refused(kind: &'static str, code: Code, reason: &'static str, message: &str) -> Status {
    touchline_ingest::metrics::INGEST.count_auth_failure(kind, reason);
    touchline_query::Error::Rejected {
        code,
        reason,
        message: message.to_owned(),
    }
    .into()
}

/// The check of every admin call, against the admin tokens in force.
#[must_use]
pub fn authorizer(tokens: AccessTokens, partners: PartnerDirectory) -> Authorize {
    token_authorizer(
        tokens,
        |lists| &lists.admin,
        partners,
        "admin",
        "an admin token",
        "ADMIN_ONLY",
        "the admin API",
    )
}

/// The check of every `TimelineService` call, against the query tokens in force; none means
/// the service is open.
#[must_use]
pub fn query_authorizer(tokens: AccessTokens, partners: PartnerDirectory) -> Authorize {
    token_authorizer(
        tokens,
        |lists| &lists.query,
        partners,
        "query",
        "a query token",
        "INTERNAL_ONLY",
        "TimelineService",
    )
}

/// A bearer token whose SHA-256 is one of the `list` in force (an empty query list lets anyone
/// in); a partner's token is refused with `PERMISSION_DENIED` and `partner_reason`.
fn token_authorizer(
    tokens: AccessTokens,
    list: fn(&Lists) -> &Vec<String>,
    partners: PartnerDirectory,
    kind: &'static str,
    a_token: &'static str,
    partner_reason: &'static str,
    service: &'static str,
) -> Authorize {
    Arc::new(move |metadata: &MetadataMap| {
        if kind == "query" && tokens.read(|lists| list(lists).is_empty()) {
            return Ok("anyone (no query tokens)".to_owned());
        }
        let token = request_token(metadata).ok_or_else(|| {
            refused(
                kind,
                Code::Unauthenticated,
                "TOKEN_MISSING",
                &format!("send `authorization: Bearer <{kind} token>`"),
            )
        })?;
        let digest = hash_token(token);
        // Every hash is compared, in constant time each.
        let known = tokens.read(|lists| {
            list(lists).iter().fold(false, |found, hash| {
                found | bool::from(hash.as_bytes().ct_eq(digest.as_bytes()))
            })
        });
        if known {
            // Which token, by a prefix of its hash (as in the configuration), never the token.
            return Ok(format!("{kind} token {}...", &digest[..8]));
        }
        // A partner's token, also one past its `expires-at`: still a partner's, not unknown.
        if matches!(
            partners.authenticate(token),
            Ok(_) | Err(touchline_ingest::Error::TokenExpired)
        ) {
            return Err(refused(
                kind,
                Code::PermissionDenied,
                partner_reason,
                &format!("this is a partner token; {service} needs {a_token}"),
            ));
        }
        Err(refused(
            kind,
            Code::Unauthenticated,
            "TOKEN_INVALID",
            &format!("the token is not {a_token}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;
    use touchline_ingest::PartnerRegistry;

    use super::*;

    #[test]
    fn an_admin_is_named_by_a_prefix_of_its_token_hash_never_by_its_token() {
        let token = "audit-me-please";
        let mut config = crate::Config::default();
        config.admin.token_sha256 = vec![hash_token(token)];
        let authorize = authorizer(
            AccessTokens::new(&config, false),
            PartnerRegistry::default().into(),
        );
        let mut metadata = MetadataMap::new();
        let bearer: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii");
        metadata.insert("authorization", bearer);
        let caller = authorize(&metadata).expect("an admin");
        assert_eq!(
            caller,
            format!("admin token {}...", &hash_token(token)[..8])
        );
        assert!(!caller.contains(token));
    }

    #[test]
    fn a_partners_expired_token_is_refused_as_a_partners_not_as_unknown() {
        let file: touchline_ingest::PartnersFile = toml::from_str(&format!(
            r#"
            [[partner]]
            id = "courier"
            tokens = [{{ sha256 = "{}", expires-at = "2020-01-01T00:00:00Z" }}]
            "#,
            hash_token("expired-courier-token"),
        ))
        .expect("valid partners file");
        let partners = PartnerRegistry::from_file(&file).expect("valid registry");
        let mut config = crate::Config::default();
        config.query.token_sha256 = vec![hash_token("service-token")];
        let authorize = query_authorizer(AccessTokens::new(&config, false), partners.into());
        let mut metadata = MetadataMap::new();
        let bearer: MetadataValue<_> = "Bearer expired-courier-token".parse().expect("ascii");
        metadata.insert("authorization", bearer);
        let refused = authorize(&metadata).expect_err("a partner's token");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
}
