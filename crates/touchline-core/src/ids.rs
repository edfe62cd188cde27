//! Identifier newtypes. Each is validated once, at the edge, so the rest of the code can trust it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest partner, customer or event id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// `id` as a result echoes it (`EventResult.event_id`): cut to at most [`MAX_ID_LEN`] bytes, on a
/// character boundary (a longer id is rejected, and still told apart from its neighbours).
#[must_use]
pub fn echoed_id(id: &str) -> &str {
    let mut end = id.len().min(MAX_ID_LEN);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}
/// The longest event type, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 64;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("has a character outside the allowed set at byte {position}")]
    InvalidCharacter { position: usize },
}

/// Ids are printable ASCII without spaces (0x21..=0x7E): they appear in sled keys, Kafka keys,
/// logs and URLs, where control characters and Unicode look-alikes only cause harm.
fn check_printable_id(value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty);
    }
    if value.len() > max {
        return Err(IdError::TooLong { max });
    }
    match value
        .bytes()
        .position(|byte| !(0x21..=0x7e).contains(&byte))
    {
        Some(position) => Err(IdError::InvalidCharacter { position }),
        None => Ok(()),
    }
}

macro_rules! printable_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as this kind of id.
            ///
            /// # Errors
            /// When `value` is empty, longer than [`MAX_ID_LEN`] or not printable ASCII.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_printable_id(&value, MAX_ID_LEN)?;
                Ok(Self(value))
            }

            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }

            #[must_use]
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Ordered and hashed as its string: sets of ids can be asked about a borrowed string.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

printable_id!(
    /// A partner (courier, store, reseller, contractor...). Comes from the partner's credential,
    /// never from a payload.
    PartnerId
);
printable_id!(
    /// The brand's id of a customer, shared by every partner. The Kafka record key.
    CustomerId
);
printable_id!(
    /// A partner's idempotency key for one touchpoint; unique per partner.
    EventId
);

/// What happened, as lowercase dotted words: `delivery.completed`, `ticket.solved`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventType(String);

impl EventType {
    /// Validates an event type: 1..=64 bytes of `[a-z0-9._-]`, starting with a letter.
    ///
    /// # Errors
    /// When `value` is empty, too long or has another character.
    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        if value.is_empty() {
            return Err(IdError::Empty);
        }
        if value.len() > MAX_EVENT_TYPE_LEN {
            return Err(IdError::TooLong {
                max: MAX_EVENT_TYPE_LEN,
            });
        }
        let allowed = |(position, byte): (usize, u8)| {
            byte.is_ascii_lowercase()
                || (position > 0 && (byte.is_ascii_digit() || matches!(byte, b'.' | b'_' | b'-')))
        };
        if let Some((position, _)) = value.bytes().enumerate().find(|pair| !allowed(*pair)) {
            return Err(IdError::InvalidCharacter { position });
        }
        Ok(Self(value))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echoed_id_is_cut_on_a_character_boundary() {
        assert_eq!(echoed_id("short"), "short");
        let long = format!("{}\u{e9}{}", "x".repeat(127), "y".repeat(70));
        assert_eq!(echoed_id(&long), "x".repeat(127));
        assert_eq!(echoed_id(&"z".repeat(200)), "z".repeat(128));
    }

    #[test]
    fn ids_accept_printable_ascii() {
        assert_eq!(
            CustomerId::parse("cust-42").map(|id| id.to_string()),
            Ok("cust-42".to_owned())
        );
        assert!(EventId::parse("a".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn ids_reject_empty_long_and_odd_characters() {
        assert_eq!(EventId::parse(""), Err(IdError::Empty));
        assert_eq!(
            EventId::parse("a".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong { max: MAX_ID_LEN })
        );
        assert_eq!(
            CustomerId::parse("with space"),
            Err(IdError::InvalidCharacter { position: 4 })
        );
        assert_eq!(
            CustomerId::parse("nul\0"),
            Err(IdError::InvalidCharacter { position: 3 })
        );
        assert_eq!(
            PartnerId::parse("caf\u{e9}"),
            Err(IdError::InvalidCharacter { position: 3 })
        );
    }

    #[test]
    fn event_types_are_lowercase_dotted_words() {
        assert!(EventType::parse("delivery.completed").is_ok());
        assert!(EventType::parse("ticket_v2.solved-late").is_ok());
        assert_eq!(
            EventType::parse("Delivery"),
            Err(IdError::InvalidCharacter { position: 0 })
        );
        assert_eq!(
            EventType::parse(".x"),
            Err(IdError::InvalidCharacter { position: 0 })
        );
        assert_eq!(
            EventType::parse("a b"),
            Err(IdError::InvalidCharacter { position: 1 })
        );
    }
}
