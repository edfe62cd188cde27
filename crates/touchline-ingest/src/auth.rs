//! Partner authentication and contracts. Partners, the SHA-256 hashes of their tokens and what
//! each may send come from a TOML file; a presented token is hashed and its SHA-256 looked up
//! among the stored hashes: the look-up's timing can tell at most how a digest the caller cannot
//! choose compares with them, never the token (see [`PartnerRegistry::authenticate`]). Tokens are
//! never logged.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use touchline_core::{Channel, PartnerId, RejectReason, Rejection, Touchpoint, UnixNanos};

use crate::{Error, Result};

/// The partners file:
///
/// ```toml
/// [[partner]]
/// id = "swift-courier"
/// name = "Swift Courier"                        # optional, for people
/// token-sha256 = ["<64 hex chars>"]             # tokens without expiry
/// tokens = [{ sha256 = "<64 hex>", expires-at = "2026-12-31T00:00:00Z" }]   # rotation
/// event-types = ["parcel.*", "delivery.*"]      # optional contract: allowed types
/// channels = ["doorstep", "sms"]                # optional contract: allowed channels
/// rate-per-second = 500                         # optional, overrides ingest.rate-per-second
/// burst = 2000                                  # optional, overrides ingest.burst
/// max-streams = 4                               # optional, overrides ingest.max-streams-per-partner
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
    #[serde(default)]
    pub token_sha256: Vec<String>,
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    #[serde(default)]
    pub rate_per_second: Option<f64>,
    #[serde(default)]
    pub burst: Option<f64>,
    #[serde(default)]
    pub max_streams: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TokenEntry {
    pub sha256: String,
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// The SHA-256 of a token, hex encoded: what the partners file stores.
#[must_use]
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// An allowed event type: exact, or every type under a prefix (`delivery.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum TypePattern {
    Exact(String),
    Prefix(String),
}

impl TypePattern {
    fn parse(pattern: &str) -> Self {
        match pattern.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(pattern.to_owned()),
        }
    }

    fn matches(&self, event_type: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == event_type,
            Self::Prefix(prefix) => event_type.starts_with(prefix.as_str()),
        }
    }
}

/// What one partner may do. `None` means "no restriction from the file": the server's defaults
/// apply to rates and streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartnerContract {
    event_types: Option<Vec<TypePattern>>,
    channels: Option<BTreeSet<Channel>>,
    pub rate_per_second: Option<f64>,
    pub burst: Option<f64>,
    pub max_streams: Option<usize>,
}

impl PartnerContract {
    /// Checks an event against the contract.
    ///
    /// # Errors
    /// [`RejectReason::TypeNotAllowed`] or [`RejectReason::ChannelNotAllowed`].
    pub fn check(&self, touchpoint: &Touchpoint) -> Result<(), Rejection> {
        if let Some(patterns) = &self.event_types
            && !patterns
                .iter()
                .any(|pattern| pattern.matches(touchpoint.event_type.as_str()))
        {
            return Err(Rejection::new(
                RejectReason::TypeNotAllowed,
                "type",
                format!(
                    "type {} is not in this partner's contract",
                    touchpoint.event_type
                ),
            ));
        }
        if let Some(channels) = &self.channels
            && !channels.contains(&touchpoint.channel)
        {
            return Err(Rejection::new(
                RejectReason::ChannelNotAllowed,
                "channel",
                format!(
                    "channel {} is not in this partner's contract",
                    touchpoint.channel
                ),
            ));
        }
        Ok(())
    }
}

/// A partner authenticated by its token.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub partner_id: PartnerId,
    pub contract: Arc<PartnerContract>,
}

#[derive(Clone)]
struct Credential {
    partner: usize,
    hash: [u8; 32],
    expires_at: Option<UnixNanos>,
}

/// Known partners, their contracts and their token hashes.
#[derive(Clone, Default)]
pub struct PartnerRegistry {
    partners: Vec<Authenticated>,
    credentials: Vec<Credential>,
    /// Each credential's index by its hash (the last one listed for a hash: a partners file
    /// lists each once).
    by_hash: HashMap<[u8; 32], usize>,
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

/// The largest partners file read: about 10,000 partners of 1 KiB each, and room to spare.
pub const MAX_PARTNERS_FILE_BYTES: u64 = 16 << 20;

fn invalid(message: String) -> Error {
    Error::PartnersFile(message)
}

fn parse_hash(id: &PartnerId, hash: &str) -> Result<[u8; 32]> {
    hex::decode(hash)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| invalid(format!("partner {id}: token hashes are 64 hex characters")))
}

fn parse_contract(id: &PartnerId, entry: &PartnerEntry) -> Result<PartnerContract> {
    let channels = entry
        .channels
        .as_ref()
        .map(|names| {
            names
                .iter()
                .map(|name| {
                    Channel::from_name(name)
                        .ok_or_else(|| invalid(format!("partner {id}: unknown channel {name:?}")))
                })
                .collect::<Result<BTreeSet<_>>>()
        })
        .transpose()?;
    let positive = |value: Option<f64>, key: &str| -> Result<Option<f64>> {
        match value {
            Some(value) if !(value.is_finite() && value > 0.0) => {
                Err(invalid(format!("partner {id}: {key} must be positive")))
            }
            other => Ok(other),
        }
    };
    let event_types = entry
        .event_types
        .as_ref()
        .map(|patterns| {
            patterns
                .iter()
                .map(|pattern| {
                    // An exact type, `prefix.*`, or `*` (every type): a `*` anywhere else
                    // (`parcel*`, `*.done`) would not mean what it seems to.
                    let prefix = pattern.strip_suffix(".*").unwrap_or(pattern);
                    if pattern != "*" && (prefix.is_empty() || prefix.contains('*')) {
                        return Err(invalid(format!(
                            "partner {id}: event type pattern {pattern:?} is neither a type, `prefix.*` nor `*`"
                        )));
                    }
                    Ok(TypePattern::parse(pattern))
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    if let Some(max) = entry.max_streams
        && !(1..=100_000).contains(&max)
    {
        return Err(invalid(format!(
            "partner {id}: max-streams must be 1 to 100000 (got {max})"
        )));
    }
    Ok(PartnerContract {
        event_types,
        channels,
        rate_per_second: positive(entry.rate_per_second, "rate-per-second")?,
        burst: positive(entry.burst, "burst")?,
        max_streams: entry.max_streams,
    })
}

impl PartnerRegistry {
    /// Builds the registry from a parsed partners file.
    ///
    /// # Errors
    /// [`Error::PartnersFile`] when an id, hash, date or contract entry is invalid or an id
    /// repeats.
    pub fn from_file(file: &PartnersFile) -> Result<Self> {
        let mut registry = Self::default();
        let mut ids = BTreeSet::new();
        let mut hashes = BTreeSet::new();
        for entry in &file.partners {
            let id = PartnerId::parse(entry.id.clone())
                .map_err(|error| invalid(format!("partner id {:?} {error}", entry.id)))?;
            if !ids.insert(id.clone()) {
                return Err(invalid(format!("partner {id} is listed twice")));
            }
            if entry.token_sha256.is_empty() && entry.tokens.is_empty() {
                return Err(invalid(format!("partner {id} has no token")));
            }
            let index = registry.partners.len();
            for hash in &entry.token_sha256 {
                registry.credentials.push(Credential {
                    partner: index,
                    hash: parse_hash(&id, hash)?,
                    expires_at: None,
                });
            }
            for token in &entry.tokens {
                let expires_at = token
                    .expires_at
                    .as_deref()
                    .map(|text| {
                        UnixNanos::parse_rfc3339(text).ok_or_else(|| {
                            invalid(format!("partner {id}: expires-at {text:?} is not RFC 3339"))
                        })
                    })
                    .transpose()?;
                registry.credentials.push(Credential {
                    partner: index,
                    hash: parse_hash(&id, &token.sha256)?,
                    expires_at,
                });
            }
            let contract = Arc::new(parse_contract(&id, entry)?);
            // This partner's hashes against every one before them (and its own).
            let first_new = hashes.len();
            for credential in &registry.credentials[first_new..] {
                if !hashes.insert(credential.hash) {
                    // A hash listed twice would authenticate as whichever entry comes last.
                    return Err(invalid(format!(
                        "partner {id}: a token hash is listed more than once in the file"
                    )));
                }
            }
            registry.partners.push(Authenticated {
                partner_id: id,
                contract,
            });
        }
        Ok(registry.indexed())
    }

    /// The registry with its credentials indexed by their hash.
    fn indexed(mut self) -> Self {
        self.by_hash = self
            .credentials
            .iter()
            .enumerate()
            .map(|(index, credential)| (credential.hash, index))
            .collect();
        self
    }

    /// Reads and parses a partners file.
    ///
    /// # Errors
    /// [`Error::PartnersFile`] when the file cannot be read (it is not a regular file, or holds
    /// more than [`MAX_PARTNERS_FILE_BYTES`]) or is invalid. A TOML error names its line and
    /// column but quotes no string of the file: a token pasted where its hash belongs is not
    /// logged.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_regular(path, MAX_PARTNERS_FILE_BYTES)
            .map_err(|error| invalid(format!("cannot read {}: {error}", path.display())))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| invalid(format!("{} is not UTF-8", path.display())))?;
        let file: PartnersFile = toml::from_str(&text).map_err(|error| {
            let at = error.span().map_or_else(String::new, |span| {
                let before = text.get(..span.start).unwrap_or_default();
                let line = before.matches('\n').count() + 1;
                let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
                format!(" at line {line}, column {column}")
            });
            invalid(format!(
                "{}{at}: {}",
                path.display(),
                crate::files::without_values(error.message())
            ))
        })?;
        Self::from_file(&file)
    }

    /// A registry of (partner, token) pairs without contracts, hashing the tokens; for dev mode
    /// and tests.
    #[must_use]
    pub fn from_tokens<'a>(pairs: impl IntoIterator<Item = (PartnerId, &'a str)>) -> Self {
        let mut registry = Self::default();
        for (partner_id, token) in pairs {
            registry.credentials.push(Credential {
                partner: registry.partners.len(),
                hash: Sha256::digest(token.as_bytes()).into(),
                expires_at: None,
            });
            registry.partners.push(Authenticated {
                partner_id,
                contract: Arc::default(),
            });
        }
        registry.indexed()
    }

    /// The partner a token belongs to: its SHA-256 looked up among the credentials' hashes. The
    /// look-up's timing tells at most how that digest, which a caller cannot choose (it would
    /// need a preimage of SHA-256), compares with the stored ones; comparing it with every hash
    /// instead cost time in proportion to the partners (about 20,000 hashes for 10,000 partners
    /// rotating their tokens), on every call, those with an invalid token included.
    ///
    /// # Errors
    /// [`Error::TokenInvalid`] for an unknown token, [`Error::TokenExpired`] for an expired one.
    pub fn authenticate(&self, token: &str, now: UnixNanos) -> Result<Authenticated> {
        self.authenticate_until(token, now)
            .map(|(partner, _)| partner)
    }

    /// [`Self::authenticate`], and when the token expires (`None`: it does not).
    ///
    /// # Errors
    /// As [`Self::authenticate`].
    pub fn authenticate_until(
        &self,
        token: &str,
        now: UnixNanos,
    ) -> Result<(Authenticated, Option<UnixNanos>)> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let credential = self
            .by_hash
            .get(&presented)
            .and_then(|index| self.credentials.get(*index))
            .ok_or(Error::TokenInvalid)?;
        if credential
            .expires_at
            .is_some_and(|expires_at| expires_at <= now)
        {
            return Err(Error::TokenExpired);
        }
        let partner = self
            .partners
            .get(credential.partner)
            .cloned()
            .ok_or(Error::TokenInvalid)?;
        Ok((partner, credential.expires_at))
    }

    /// The known partner ids.
    #[must_use]
    pub fn partner_ids(&self) -> Vec<&PartnerId> {
        self.partners
            .iter()
            .map(|partner| &partner.partner_id)
            .collect()
    }
}

/// The bearer token of a call's `authorization` metadata, if it has one.
#[must_use]
pub fn request_token(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token)
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
    use std::collections::BTreeMap;

    use touchline_core::{CustomerId, EventId, EventType, JourneyStage};

    use super::*;

    const NOW: UnixNanos = UnixNanos(1_800_000_000_000_000_000);

    fn registry() -> PartnerRegistry {
        let file: PartnersFile = toml::from_str(&format!(
            r#"
            [[partner]]
            id = "courier"
            token-sha256 = ["{}"]
            tokens = [{{ sha256 = "{}", expires-at = "2020-01-01T00:00:00Z" }}, {{ sha256 = "{}", expires-at = "2099-01-01T00:00:00Z" }}]
            event-types = ["parcel.*", "delivery.completed"]
            channels = ["doorstep", "sms"]
            [[partner]]
            id = "store"
            token-sha256 = ["{}"]
            "#,
            hash_token("new-courier-token"),
            hash_token("expired-courier-token"),
            hash_token("rotating-courier-token"),
            hash_token("store-token"),
        ))
        .expect("valid partners file");
        PartnerRegistry::from_file(&file).expect("valid registry")
    }

    fn id(registry: &PartnerRegistry, token: &str) -> Result<String> {
        registry
            .authenticate(token, NOW)
            .map(|partner| partner.partner_id.to_string())
    }

    #[test]
    fn tokens_authenticate_their_partner_during_rotation_until_expiry() {
        let registry = registry();
        assert_eq!(
            id(&registry, "new-courier-token").ok().as_deref(),
            Some("courier")
        );
        assert_eq!(
            id(&registry, "rotating-courier-token").ok().as_deref(),
            Some("courier")
        );
        assert!(matches!(
            id(&registry, "expired-courier-token"),
            Err(Error::TokenExpired)
        ));
        assert_eq!(id(&registry, "store-token").ok().as_deref(), Some("store"));
        assert!(matches!(
            id(&registry, "store-token "),
            Err(Error::TokenInvalid)
        ));
        assert!(matches!(id(&registry, ""), Err(Error::TokenInvalid)));
    }

    fn touchpoint(event_type: &str, channel: Channel) -> Touchpoint {
        Touchpoint {
            event_id: EventId::parse("e").expect("valid"),
            customer_id: CustomerId::parse("c").expect("valid"),
            event_type: EventType::parse(event_type).expect("valid"),
            occurred_at: UnixNanos(0),
            channel,
            stage: JourneyStage::Fulfil,
            outcome: None,
            attributes: BTreeMap::new(),
            payload: Vec::new(),
        }
    }

    #[test]
    fn contracts_limit_event_types_and_channels() {
        let registry = registry();
        let courier = registry
            .authenticate("new-courier-token", NOW)
            .expect("authenticates");
        assert!(
            courier
                .contract
                .check(&touchpoint("parcel.scanned", Channel::Doorstep))
                .is_ok()
        );
        assert!(
            courier
                .contract
                .check(&touchpoint("delivery.completed", Channel::Sms))
                .is_ok()
        );
        let reason = |t: &Touchpoint| {
            courier
                .contract
                .check(t)
                .err()
                .map(|rejection| rejection.reason)
        };
        assert_eq!(
            reason(&touchpoint("delivery.late", Channel::Doorstep)),
            Some(RejectReason::TypeNotAllowed)
        );
        assert_eq!(
            reason(&touchpoint("parcel.scanned", Channel::Web)),
            Some(RejectReason::ChannelNotAllowed)
        );
        let store = registry
            .authenticate("store-token", NOW)
            .expect("authenticates");
        assert!(
            store
                .contract
                .check(&touchpoint("anything.at-all", Channel::Web))
                .is_ok()
        );
    }

    #[test]
    fn bad_partner_files_are_refused() {
        let refused = |text: &str| {
            toml::from_str::<PartnersFile>(text)
                .map_err(|error| error.to_string())
                .and_then(|file| {
                    PartnerRegistry::from_file(&file)
                        .map(|_| ())
                        .map_err(|error| error.to_string())
                })
                .is_err()
        };
        let hash = hash_token("t");
        assert!(refused(
            "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"abc\"]\n"
        ));
        assert!(refused(&format!(
            "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{hash}\"]\n[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{hash}\"]\n"
        )));
        assert!(refused("[[partner]]\nid = \"p\"\ntoken = \"plain\"\n"));
        assert!(refused("[[partner]]\nid = \"p\"\n"));
        assert!(refused(&format!(
            "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{hash}\"]\nchannels = [\"carrier-pigeon\"]\n"
        )));
        assert!(refused(&format!(
            "[[partner]]\nid = \"p\"\ntokens = [{{ sha256 = \"{hash}\", expires-at = \"soon\" }}]\n"
        )));
        assert!(refused(&format!(
            "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{hash}\"]\nrate-per-second = -1\n"
        )));
        for max_streams in [0, 100_001] {
            assert!(refused(&format!(
                "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{hash}\"]\nmax-streams = {max_streams}\n"
            )));
        }
        for pattern in ["parcel*", "*.done", "**", ".*", "a.*.*"] {
            assert!(
                refused(&format!(
                    "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{hash}\"]\nevent-types = [\"{pattern}\"]\n"
                )),
                "{pattern}"
            );
        }
        assert!(!refused(&format!(
            "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{hash}\"]\nevent-types = [\"parcel.*\", \"a.b\", \"*\"]\nmax-streams = 1\n"
        )));
    }

    #[test]
    fn a_file_error_quotes_no_value_of_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("partners.toml");
        // Tokens pasted where their hashes belong, in the shapes a TOML error would quote.
        for text in [
            "[[partner]]\nid = \"p\"\ntoken-sha256 = \"plain-secret-xyz\"\n",
            "[[partner]]\nid = \"p\"\ntokens = [\"plain-secret-xyz\"]\n",
            "[[partner]]\nid = \"p\"\ntoken = \"plain-secret-xyz\"\n",
            "[[partner]]\nid = \"p\"\ntoken-sha256 = [plain-secret-xyz]\n",
        ] {
            std::fs::write(&path, text)?;
            let error = PartnerRegistry::load(&path)
                .expect_err("refused")
                .to_string();
            assert!(!error.contains("plain-secret-xyz"), "{error}");
            assert!(error.contains("at line 3"), "{error}");
        }
        Ok(())
    }

    #[test]
    fn one_token_hash_for_two_partners_is_refused() {
        let hash = hash_token("shared");
        let file: PartnersFile = toml::from_str(&format!(
            "[[partner]]\nid = \"p\"\ntoken-sha256 = [\"{hash}\"]\n[[partner]]\nid = \"q\"\ntoken-sha256 = [\"{hash}\"]\n"
        ))
        .expect("parses");
        assert!(PartnerRegistry::from_file(&file).is_err());
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
