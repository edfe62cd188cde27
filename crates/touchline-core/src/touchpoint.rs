//! The touchpoint: one touch of one customer by one partner, validated.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{CustomerId, EventId, EventType, UnixNanos};

macro_rules! named_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $number:literal => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($variant = $number),+
        }

        impl $name {
            /// Every value, in contract order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The contract's number for this value.
            #[must_use]
            pub fn number(self) -> i32 {
                self as i32
            }

            /// The value with this contract number, if there is one.
            #[must_use]
            pub fn from_number(number: i32) -> Option<Self> {
                match number {
                    $($number => Some(Self::$variant),)+
                    _ => None,
                }
            }

            /// The lowercase name used in summaries, the CLI and JSON.
            #[must_use]
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// The value with this lowercase name, if there is one.
            #[must_use]
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(self.name())
            }
        }
    };
}

named_enum!(
    /// Where in the customer journey a touch sits.
    JourneyStage {
        Discover = 1 => "discover",
        Purchase = 2 => "purchase",
        Fulfil = 3 => "fulfil",
        Use = 4 => "use",
        Support = 5 => "support",
        Advocate = 6 => "advocate",
    }
);

named_enum!(
    /// Where the touch happened.
    Channel {
        Unspecified = 0 => "unspecified",
        Web = 1 => "web",
        MobileApp = 2 => "mobile-app",
        Store = 3 => "store",
        Phone = 4 => "phone",
        Email = 5 => "email",
        Chat = 6 => "chat",
        Sms = 7 => "sms",
        Doorstep = 8 => "doorstep",
        Social = 9 => "social",
        Other = 10 => "other",
    }
);

named_enum!(
    /// How the touch went for the customer.
    Sentiment {
        Unknown = 0 => "unknown",
        Positive = 1 => "positive",
        Neutral = 2 => "neutral",
        Negative = 3 => "negative",
    }
);

/// The outcome of a touch. `score` is in `[0, 100]` when present.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub sentiment: Sentiment,
    pub score: Option<f64>,
}

/// A validated touchpoint. The partner is not part of it: it travels in the [`crate::Envelope`],
/// taken from the credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Touchpoint {
    pub event_id: EventId,
    pub customer_id: CustomerId,
    pub event_type: EventType,
    pub occurred_at: UnixNanos,
    pub channel: Channel,
    pub stage: JourneyStage,
    pub outcome: Option<Outcome>,
    pub attributes: BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

/// A stored [`Touchpoint`] read without copying its strings: its fields in the same order, each
/// string, the attributes and the payload borrowed from the bytes that [`Touchpoint`]'s
/// `Serialize` wrote (so it deserializes from them; checked against the store's format in
/// touchline-projection). What a read that only re-encodes touchpoints decodes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TouchpointView<'a> {
    pub event_id: &'a str,
    pub customer_id: &'a str,
    pub event_type: &'a str,
    pub occurred_at: UnixNanos,
    pub channel: Channel,
    pub stage: JourneyStage,
    pub outcome: Option<Outcome>,
    /// In key order, as the map was written.
    #[serde(borrow, deserialize_with = "borrowed_map")]
    pub attributes: Vec<(&'a str, &'a str)>,
    pub payload: &'a [u8],
}

/// A map of strings (as `BTreeMap<String, String>` serializes) as borrowed pairs, in order.
fn borrowed_map<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(&'de str, &'de str)>, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(&'de str, &'de str)>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a map of strings")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            // The hint is the stored length: bounded by what a touchpoint may hold, not trusted
            // beyond that.
            let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
            while let Some(pair) = map.next_entry()? {
                pairs.push(pair);
            }
            Ok(pairs)
        }
    }
    deserializer.deserialize_map(Pairs)
}

impl Touchpoint {
    /// This touchpoint as a view of its fields.
    #[must_use]
    pub fn view(&self) -> TouchpointView<'_> {
        // Every field named: a field added to the touchpoint does not compile here until the
        // view has it too (the view reads the stored bytes in the same order).
        let Self {
            event_id,
            customer_id,
            event_type,
            occurred_at,
            channel,
            stage,
            outcome,
            attributes,
            payload,
        } = self;
        TouchpointView {
            event_id: event_id.as_str(),
            customer_id: customer_id.as_str(),
            event_type: event_type.as_str(),
            occurred_at: *occurred_at,
            channel: *channel,
            stage: *stage,
            outcome: *outcome,
            attributes: attributes
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .collect(),
            payload,
        }
    }

    /// The sentiment bucket this touchpoint counts in.
    #[must_use]
    pub fn sentiment(&self) -> Sentiment {
        self.outcome
            .map_or(Sentiment::Unknown, |outcome| outcome.sentiment)
    }
}
