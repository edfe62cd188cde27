//! Partner authentication. Partners and the SHA-256 hashes of their tokens come from a TOML file;
//! a presented token is hashed and compared with every stored hash in constant time, so neither
//! the token nor which partner nearly matched leaks through timing. Tokens are never logged.

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use touchline_core::PartnerId;

use crate::{Error, Result};

/// The partners file:
///
/// ```toml
/// [[partner]]
/// id = "swift-courier"
/// name = "Swift Courier"                       # optional, for people
/// token-sha256 = ["<64 hex chars>", "..."]     # two while rotating
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PartnersFile {
    #[serde(default, rename = "partner")]
    pub partners: Vec<PartnerEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PartnerEntry {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub token_sha256: Vec<String>,
}

/// The SHA-256 of a token, hex encoded: what the partners file stores.
#[must_use]
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Known partners and their token hashes.
#[derive(Clone, Default)]
pub struct PartnerRegistry {
    credentials: Vec<(PartnerId, [u8; 32])>,
}

impl std::fmt::Debug for PartnerRegistry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes stay out of logs too.
        formatter
            .debug_struct("PartnerRegistry")
            .field("partners", &self.partner_ids())
            .finish()
    }
}

impl PartnerRegistry {
    /// Builds the registry from a parsed partners file.
    ///
    /// # Errors
    /// [`Error::PartnersFile`] when an id or a hash is invalid or an id repeats.
    pub fn from_file(file: &PartnersFile) -> Result<Self> {
        let mut credentials = Vec::new();
        let mut ids = std::collections::BTreeSet::new();
        for entry in &file.partners {
            let id = PartnerId::parse(entry.id.clone()).map_err(|error| {
                Error::PartnersFile(format!("partner id {:?} {error}", entry.id))
            })?;
            if !ids.insert(id.clone()) {
                return Err(Error::PartnersFile(format!("partner {id} is listed twice")));
            }
            if entry.token_sha256.is_empty() {
                return Err(Error::PartnersFile(format!(
                    "partner {id} has no token-sha256"
                )));
            }
            for hash in &entry.token_sha256 {
                let bytes = hex::decode(hash)
                    .ok()
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                    .ok_or_else(|| {
                        Error::PartnersFile(format!(
                            "partner {id}: token-sha256 entries are 64 hex characters"
                        ))
                    })?;
                credentials.push((id.clone(), bytes));
            }
        }
        Ok(Self { credentials })
    }

    /// Reads and parses a partners file.
    ///
    /// # Errors
    /// [`Error::PartnersFile`] when the file cannot be read or is invalid.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            Error::PartnersFile(format!("cannot read {}: {error}", path.display()))
        })?;
        let file: PartnersFile = toml::from_str(&text)
            .map_err(|error| Error::PartnersFile(format!("{}: {error}", path.display())))?;
        Self::from_file(&file)
    }

    /// A registry of (partner, token) pairs, hashing the tokens; for dev mode and tests.
    #[must_use]
    pub fn from_tokens<'a>(pairs: impl IntoIterator<Item = (PartnerId, &'a str)>) -> Self {
        let credentials = pairs
            .into_iter()
            .map(|(id, token)| (id, Sha256::digest(token.as_bytes()).into()))
            .collect();
        Self { credentials }
    }

    /// The partner a token belongs to. Compares against every credential, in constant time each.
    #[must_use]
    pub fn authenticate(&self, token: &str) -> Option<PartnerId> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (partner, hash) in &self.credentials {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(partner.clone());
            }
        }
        found
    }

    /// The known partner ids.
    #[must_use]
    pub fn partner_ids(&self) -> Vec<&PartnerId> {
        let mut ids: Vec<_> = self.credentials.iter().map(|(id, _)| id).collect();
        ids.dedup();
        ids
    }
}

/// The token of an `authorization: Bearer <token>` header value.
#[must_use]
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> PartnerRegistry {
        let file: PartnersFile = toml::from_str(&format!(
            "[[partner]]\nid = \"courier\"\ntoken-sha256 = [\"{}\", \"{}\"]\n[[partner]]\nid = \"store\"\ntoken-sha256 = [\"{}\"]\n",
            hash_token("old-courier-token"),
            hash_token("new-courier-token"),
            hash_token("store-token"),
        ))
        .expect("valid partners file");
        PartnerRegistry::from_file(&file).expect("valid registry")
    }

    #[test]
    fn tokens_authenticate_their_partner_including_both_rotation_tokens() {
        let registry = registry();
        let id = |token| {
            registry
                .authenticate(token)
                .map(|partner| partner.to_string())
        };
        assert_eq!(id("old-courier-token").as_deref(), Some("courier"));
        assert_eq!(id("new-courier-token").as_deref(), Some("courier"));
        assert_eq!(id("store-token").as_deref(), Some("store"));
        assert_eq!(id("store-token "), None);
        assert_eq!(id(""), None);
    }

    #[test]
    fn bad_partner_files_are_refused() {
        let bad_hash: PartnersFile =
            toml::from_str("[[partner]]\nid = \"p\"\ntoken-sha256 = [\"abc\"]\n").expect("parses");
        assert!(PartnerRegistry::from_file(&bad_hash).is_err());
        let twice: PartnersFile = toml::from_str(&format!(
            "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{0}\"]\n[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{0}\"]\n",
            hash_token("t")
        ))
        .expect("parses");
        assert!(PartnerRegistry::from_file(&twice).is_err());
        assert!(
            toml::from_str::<PartnersFile>("[[partner]]\nid = \"p\"\ntoken = \"plain\"\n").is_err()
        );
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
