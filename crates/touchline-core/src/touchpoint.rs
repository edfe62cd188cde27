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

impl Touchpoint {
    /// The sentiment bucket this touchpoint counts in.
    #[must_use]
    pub fn sentiment(&self) -> Sentiment {
        self.outcome
            .map_or(Sentiment::Unknown, |outcome| outcome.sentiment)
    }
}
