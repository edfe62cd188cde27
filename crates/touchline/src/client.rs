//! The command-line clients: `publish` (a partner streaming JSON Lines), `timeline` and `summary`
//! (an internal service reading, printed for people).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use touchline_core::{Channel as TouchChannel, JourneyStage, Sentiment, UnixNanos};
use touchline_proto::v1;
use touchline_proto::v1::timeline_service_client::TimelineServiceClient;

use crate::connect::Target;

/// One line of a `touchline publish` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonTouchpoint {
    pub event_id: String,
    pub customer_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// RFC 3339, e.g. `2026-11-25T10:00:00Z`.
    pub occurred_at: String,
    #[serde(default)]
    pub channel: Option<String>,
    pub stage: String,
    #[serde(default)]
    pub outcome: Option<JsonOutcome>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonOutcome {
    pub sentiment: String,
    #[serde(default)]
    pub score: Option<f64>,
}

impl JsonTouchpoint {
    /// The wire touchpoint. Names that the contract does not know are refused here, before
    /// anything is sent.
    ///
    /// # Errors
    /// When the time, channel, stage or sentiment cannot be represented.
    pub fn into_wire(self) -> anyhow::Result<v1::Touchpoint> {
        let occurred_at = UnixNanos::parse_rfc3339(&self.occurred_at)
            .with_context(|| format!("occurred_at {:?} is not RFC 3339", self.occurred_at))?;
        let (seconds, nanos) = occurred_at.to_parts();
        let channel = match self.channel.as_deref() {
            None => TouchChannel::Unspecified,
            Some(name) => TouchChannel::from_name(name)
                .with_context(|| format!("unknown channel {name:?}"))?,
        };
        let stage = JourneyStage::from_name(&self.stage)
            .with_context(|| format!("unknown stage {:?}", self.stage))?;
        let outcome = self
            .outcome
            .map(|outcome| {
                Sentiment::from_name(&outcome.sentiment)
                    .map(|sentiment| v1::Outcome {
                        sentiment: sentiment.number(),
                        score: outcome.score,
                    })
                    .with_context(|| format!("unknown sentiment {:?}", outcome.sentiment))
            })
            .transpose()?;
        Ok(v1::Touchpoint {
            event_id: self.event_id,
            customer_id: self.customer_id,
            r#type: self.event_type,
            occurred_at: Some(prost_types_timestamp(seconds, nanos)),
            channel: channel.number(),
            stage: stage.number(),
            outcome,
            attributes: self.attributes.into_iter().collect(),
            payload: Vec::new(),
        })
    }
}

fn prost_types_timestamp(seconds: i64, nanos: i32) -> ::prost_types::Timestamp {
    ::prost_types::Timestamp { seconds, nanos }
}

/// Adds `authorization: Bearer TOKEN` to a request.
///
/// # Errors
/// When the token cannot be a header value.
pub fn with_token<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", bearer(token)?);
    Ok(request)
}

/// The `authorization` header value for `token`.
fn bearer(token: &str) -> anyhow::Result<MetadataValue<tonic::metadata::Ascii>> {
    format!("Bearer {token}")
        .parse()
        .context("the token is not a valid header value")
}

/// The longest line of a `touchline publish` file: far more than an event may take (the node's
/// `ingest.limits.max-event-bytes` is 64 KiB unless raised), and a bound on what one line costs.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// The touchpoints of a JSON Lines file, read a line at a time, each with its line number. Blank
/// lines are skipped. The first line that cannot be read or converted (not UTF-8, over
/// [`MAX_LINE_BYTES`], not a touchpoint) is yielded as an error naming the line, and ends it.
#[derive(Debug)]
pub struct JsonLines {
    reader: std::io::BufReader<std::fs::File>,
    line: usize,
    ended: bool,
}

impl JsonLines {
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Self {
            reader: std::io::BufReader::new(file),
            line: 0,
            ended: false,
        })
    }

    /// The next line's bytes without its end, `None` at the end of the file.
    fn next_line(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        use std::io::{BufRead as _, Read as _};
        let mut bytes = Vec::new();
        let limit = u64::try_from(MAX_LINE_BYTES + 1).unwrap_or(u64::MAX);
        let read = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut bytes)
            .with_context(|| format!("line {}: cannot read the file", self.line + 1))?;
        if read == 0 {
            return Ok(None);
        }
        self.line += 1;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        } else if bytes.len() > MAX_LINE_BYTES {
            anyhow::bail!(
                "line {}: longer than {MAX_LINE_BYTES} bytes (one touchpoint per line)",
                self.line
            );
        }
        Ok(Some(bytes))
    }

    fn next_event(&mut self) -> anyhow::Result<Option<(usize, v1::Touchpoint)>> {
        while let Some(bytes) = self.next_line()? {
            let line = self.line;
            let text =
                std::str::from_utf8(&bytes).with_context(|| format!("line {line}: not UTF-8"))?;
            if text.trim().is_empty() {
                continue;
            }
            let parsed: JsonTouchpoint = serde_json::from_str(text)
                .with_context(|| format!("line {line}: invalid JSON touchpoint"))?;
            let event = parsed.into_wire().with_context(|| format!("line {line}"))?;
            return Ok(Some((line, event)));
        }
        Ok(None)
    }
}

impl Iterator for JsonLines {
    type Item = anyhow::Result<(usize, v1::Touchpoint)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        let next = self.next_event().transpose();
        self.ended = !matches!(next, Some(Ok(_)));
        next
    }
}

/// Checks every line of a JSON Lines file, a line at a time, and counts its touchpoints: `touchline
/// publish` sends nothing of a file with a bad line.
///
/// # Errors
/// When the file cannot be read or a line is invalid (the message names the line).
pub fn check_json_lines(path: &Path) -> anyhow::Result<usize> {
    let mut count = 0;
    for event in JsonLines::open(path)? {
        event?;
        count += 1;
    }
    Ok(count)
}

/// Reads a JSON Lines file into wire touchpoints, with the line number of each.
///
/// # Errors
/// When the file cannot be read or a line is invalid (the message names the line).
pub fn read_json_lines(path: &Path) -> anyhow::Result<Vec<(usize, v1::Touchpoint)>> {
    JsonLines::open(path)?.collect()
}

pub async fn timeline_client(
    endpoint: &Target,
    token: Option<&str>,
) -> anyhow::Result<TimelineClient> {
    let token = token.map(bearer).transpose()?;
    let channel = endpoint.connect().await?;
    // Pages stop at about 2 MiB of entries; a single large entry can go past tonic's 4 MiB.
    Ok(
        TimelineServiceClient::with_interceptor(channel, BearerToken(token))
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// A `TimelineService` client that sends the query token, if any, with every call.
pub type TimelineClient = TimelineServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer TOKEN` to every call, when there is a token.
#[derive(Debug, Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

pub fn timestamp_text(timestamp: Option<&::prost_types::Timestamp>) -> String {
    timestamp
        .and_then(touchline_proto::convert::instant)
        .map_or_else(|| "-".to_owned(), UnixNanos::to_rfc3339)
}

fn enum_name<T>(
    number: i32,
    from_number: fn(i32) -> Option<T>,
    name: fn(T) -> &'static str,
) -> String {
    from_number(number).map_or_else(|| number.to_string(), |value| name(value).to_owned())
}

/// One timeline entry as a line of text.
#[must_use]
pub fn format_entry(entry: &v1::TimelineEntry) -> String {
    let Some(touchpoint) = &entry.touchpoint else {
        return String::from("(empty entry)");
    };
    let outcome = touchpoint.outcome.map_or_else(String::new, |outcome| {
        let sentiment = enum_name(outcome.sentiment, Sentiment::from_number, Sentiment::name);
        match outcome.score {
            Some(score) => format!("{sentiment} {score:.0}"),
            None => sentiment,
        }
    });
    let mut attributes: Vec<_> = touchpoint
        .attributes
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    attributes.sort();
    format!(
        "{}  {:<9} {:<18} {:<26} {:<11} {:<12} {}",
        timestamp_text(touchpoint.occurred_at.as_ref()),
        enum_name(
            touchpoint.stage,
            JourneyStage::from_number,
            JourneyStage::name
        ),
        entry.partner_id,
        touchpoint.r#type,
        enum_name(
            touchpoint.channel,
            TouchChannel::from_number,
            TouchChannel::name
        ),
        outcome,
        attributes.join(" "),
    )
}

/// Prints a customer's whole timeline (every page), or at most `limit` entries.
///
/// # Errors
/// When the server cannot be reached or refuses the request.
pub async fn print_timeline(
    endpoint: &Target,
    token: Option<&str>,
    mut request: v1::GetTimelineRequest,
    limit: Option<usize>,
) -> anyhow::Result<usize> {
    let mut client = timeline_client(endpoint, token).await?;
    let mut printed = 0;
    crate::outln!(
        "{:<24}  {:<9} {:<18} {:<26} {:<11} {:<12} attributes",
        "occurred at",
        "stage",
        "partner",
        "type",
        "channel",
        "outcome"
    )?;
    loop {
        let page = client.get_timeline(request.clone()).await?.into_inner();
        for entry in &page.entries {
            if limit.is_some_and(|limit| printed >= limit) {
                return Ok(printed);
            }
            crate::outln!("{}", format_entry(entry))?;
            printed += 1;
        }
        if page.next_page_token.is_empty() {
            return Ok(printed);
        }
        request.page_token = page.next_page_token;
    }
}

/// Prints a customer's summary.
///
/// # Errors
/// When the server cannot be reached or has no such customer.
pub async fn print_summary(
    endpoint: &Target,
    token: Option<&str>,
    customer_id: String,
) -> anyhow::Result<()> {
    let mut client = timeline_client(endpoint, token).await?;
    let summary = client
        .get_customer_summary(v1::GetCustomerSummaryRequest { customer_id })
        .await?
        .into_inner();
    // In key order, as the map keeps them.
    let counts = |map: &std::collections::BTreeMap<String, u64>| {
        map.iter()
            .map(|(key, count)| format!("{key} {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    crate::outln!("customer       {}", summary.customer_id)?;
    crate::outln!("touchpoints    {}", summary.total_touchpoints)?;
    crate::outln!(
        "current stage  {}",
        enum_name(
            summary.current_stage,
            JourneyStage::from_number,
            JourneyStage::name
        )
    )?;
    if let Some(first) = &summary.first_touch {
        crate::outln!("first touch    {}", format_entry(first))?;
    }
    if let Some(last) = &summary.last_touch {
        crate::outln!("last touch     {}", format_entry(last))?;
    }
    crate::outln!("by stage       {}", counts(&summary.by_stage))?;
    crate::outln!("by sentiment   {}", counts(&summary.by_sentiment))?;
    crate::outln!("by partner     {}", counts(&summary.by_partner))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_become_wire_touchpoints() {
        let line = r#"{"event_id":"e1","customer_id":"c1","type":"order.placed","occurred_at":"2026-11-01T10:00:00Z","channel":"web","stage":"purchase","outcome":{"sentiment":"positive","score":80},"attributes":{"order":"o-1"}}"#;
        let parsed: JsonTouchpoint = serde_json::from_str(line).expect("parses");
        let wire = parsed.into_wire().expect("converts");
        assert_eq!(wire.stage, JourneyStage::Purchase.number());
        assert_eq!(wire.channel, TouchChannel::Web.number());
        assert_eq!(wire.outcome.map(|outcome| outcome.score), Some(Some(80.0)));
    }

    #[test]
    fn unknown_names_are_refused_before_sending() {
        let line = r#"{"event_id":"e1","customer_id":"c1","type":"x","occurred_at":"2026-11-01T10:00:00Z","stage":"teleport"}"#;
        let parsed: JsonTouchpoint = serde_json::from_str(line).expect("parses");
        assert!(parsed.into_wire().is_err());
    }

    fn file_of(bytes: &[u8]) -> tempfile::NamedTempFile {
        use std::io::Write as _;
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(bytes).expect("written");
        file
    }

    const LINE: &str = r#"{"event_id":"e1","customer_id":"c1","type":"order.placed","occurred_at":"2026-11-01T10:00:00Z","stage":"purchase"}"#;

    #[test]
    fn a_file_is_read_a_line_at_a_time_with_its_line_numbers() {
        // Blank lines, CRLF ends and a last line without its end.
        let file = file_of(format!("{LINE}\n\n  \r\n{LINE}\r\n{LINE}").as_bytes());
        let lines: Vec<usize> = JsonLines::open(file.path())
            .expect("opens")
            .map(|event| event.expect("valid").0)
            .collect();
        assert_eq!(lines, [1, 4, 5]);
        assert_eq!(check_json_lines(file.path()).expect("valid"), 3);
        assert_eq!(check_json_lines(file_of(b"").path()).expect("empty"), 0);
    }

    #[test]
    fn the_first_bad_line_is_named_and_ends_the_file() {
        let too_long = format!("{}\n{LINE}\n", " ".repeat(MAX_LINE_BYTES + 1));
        for (what, bytes, named) in [
            (
                "invalid JSON",
                format!("{LINE}\n{{\n{LINE}\n").into_bytes(),
                "line 2: invalid JSON",
            ),
            (
                "not UTF-8",
                [LINE.as_bytes(), b"\n\xff\n"].concat(),
                "line 2: not UTF-8",
            ),
            ("too long", too_long.into_bytes(), "line 1: longer than"),
        ] {
            let file = file_of(&bytes);
            let error = check_json_lines(file.path()).expect_err(what);
            assert!(format!("{error:#}").contains(named), "{what}: {error:#}");
            let read: Vec<_> = JsonLines::open(file.path()).expect("opens").collect();
            assert!(
                read.last().is_some_and(Result::is_err),
                "{what}: ends on its error"
            );
            assert!(read.iter().rev().skip(1).all(Result::is_ok), "{what}");
        }
        // A line of exactly the limit is read.
        let padded = format!("{LINE}{}", " ".repeat(MAX_LINE_BYTES - LINE.len()));
        assert_eq!(
            check_json_lines(file_of(padded.as_bytes()).path()).expect("at the limit"),
            1
        );
        assert!(check_json_lines(Path::new("/nonexistent/events.jsonl")).is_err());
    }
}
