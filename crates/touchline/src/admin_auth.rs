//! Who may call the `AdminService`: holders of an admin token (its SHA-256 is in the
//! configuration). A partner's token is recognised and refused with PERMISSION_DENIED, so that a
//! partner learns it is authenticated but not allowed, rather than that its token is wrong.

use std::sync::Arc;

use subtle::ConstantTimeEq as _;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use touchline_core::UnixNanos;
use touchline_ingest::auth::request_token;
use touchline_ingest::{PartnerDirectory, hash_token};
use touchline_query::admin::Authorize;

/// The admin token `touchline dev` accepts when the configuration names none. Development only.
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";

fn refused(code: Code, reason: &'static str, message: &str) -> Status {
    touchline_query::Error::Rejected {
        code,
        reason,
        message: message.to_owned(),
    }
    .into()
}

/// The check of every admin call: `hashes` are the admin tokens' SHA-256 in hex.
#[must_use]
pub fn authorizer(hashes: Vec<String>, partners: PartnerDirectory) -> Authorize {
    let hashes: Vec<String> = hashes.into_iter().map(|hash| hash.to_lowercase()).collect();
    Arc::new(move |metadata: &MetadataMap| {
        let token = request_token(metadata).ok_or_else(|| {
            refused(
                Code::Unauthenticated,
                "TOKEN_MISSING",
                "send `authorization: Bearer <admin token>`",
            )
        })?;
        let digest = hash_token(token);
        // Every hash is compared, in constant time each.
        let admin = hashes.iter().fold(false, |found, hash| {
            found | bool::from(hash.as_bytes().ct_eq(digest.as_bytes()))
        });
        if admin {
            return Ok(());
        }
        if partners
            .current()
            .authenticate(token, UnixNanos::now())
            .is_ok()
        {
            return Err(refused(
                Code::PermissionDenied,
                "ADMIN_ONLY",
                "this is a partner token; the admin API needs an admin token",
            ));
        }
        Err(refused(
            Code::Unauthenticated,
            "TOKEN_INVALID",
            "the token is not an admin token",
        ))
    })
}
