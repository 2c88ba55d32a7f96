//! Replay on request (SPEC 4a), the pure part: reading and checking a
//! consumer's request, the result message, the gaps of a replayed range and
//! the rate limit. No I/O, no clock, no MQTT here, so every rule can be
//! tested on its own and the task that serves requests only wires them to
//! the buffer and the broker.
//!
//! A request comes from whoever may publish to `{root}/commands/replay`, so
//! nothing in it is trusted: its size is bounded before it is parsed, every
//! field is checked, an error never repeats more than a short prefix of what
//! was sent, and nothing kept per request grows with the range asked for.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::record::{Kind, StreamKey};

/// Requests are a few hundred bytes; anything much larger is not one, and is
/// refused before the JSON parser spends time or memory on it.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// The consumer's own correlation id is echoed back in the result; a bound
/// keeps it an id rather than a payload.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// How much of a user-provided string an error repeats: enough to recognise
/// it, not enough to turn the result topic into an echo service.
const SHOWN_CHARS: usize = 40;

/// Missing ranges kept per request. A range where every other record is gone
/// would otherwise need one entry per record (memory and a result message
/// growing with `mqtt.replay_max_records`); past this many the last range is
/// extended to the end of the request instead, see [`Gaps`].
pub const MAX_MISSING_RANGES: usize = 1000;

/// The buffer stores seqs as SQLite integers (i64); a larger seq can never
/// exist, and refusing it here keeps every later conversion exact.
const MAX_SEQ: u64 = i64::MAX as u64;

/// A validated replay request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub request_id: String,
    pub stream: StreamKey,
    pub from_seq: u64,
    pub to_seq: u64,
}

impl Request {
    /// Records the range spans, what `mqtt.replay_max_records` bounds.
    pub fn len(&self) -> u64 {
        // `parse` guarantees 1 <= from_seq <= to_seq; saturating keeps a
        // hand-built request from wrapping.
        self.to_seq.saturating_sub(self.from_seq).saturating_add(1)
    }

    /// Never true for a parsed request (a range holds at least one seq);
    /// here because a `len` without it is a clippy error.
    pub fn is_empty(&self) -> bool {
        self.to_seq < self.from_seq
    }
}

/// What a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// The buffer's epoch: a seq means nothing in another one.
    pub epoch: &'a str,
    /// The configured connection ids; a request may name no other.
    pub connections: &'a [String],
    /// `mqtt.replay_max_records`.
    pub max_records: u64,
}

/// A request that is refused: answered with `error` set, nothing else happens.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Refusal {
    /// The consumer's id when it could be read, so the answer can be matched
    /// to its request.
    pub request_id: Option<String>,
    /// For the consumer's operator: what was wrong, with at most a short
    /// prefix of anything the request carried.
    pub error: String,
}

/// Reads and checks a request payload against `scope`. Unknown fields are
/// ignored, so consumers may add their own (a newer client, a trace id).
pub fn parse(payload: &[u8], scope: &Scope<'_>) -> Result<Request, Refusal> {
    let refuse = |request_id: Option<String>, error: String| Refusal { request_id, error };
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(refuse(
            None,
            format!(
                "request too large: {} bytes, a replay request may have at most {MAX_REQUEST_BYTES}",
                payload.len()
            ),
        ));
    }
    // serde_json's syntax errors name a position, never the text.
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| refuse(None, format!("invalid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(refuse(
            None,
            format!("expected a JSON object, found {}", describe(&value)),
        ));
    };

    let request_id = request_id(&fields)?;
    let with_id = |error: String| refuse(Some(request_id.clone()), error);

    let kind = match fields.get("kind") {
        None | Some(Value::Null) => return Err(with_id(format!("kind is missing ({KINDS})"))),
        Some(Value::String(s)) => Kind::parse(s)
            .ok_or_else(|| with_id(format!("unknown kind {}: expected {KINDS}", shown(s))))?,
        Some(other) => {
            return Err(with_id(format!(
                "kind must be a string ({KINDS}), found {}",
                describe(other)
            )))
        }
    };

    let connection = match fields.get("connection") {
        None => {
            return Err(with_id(
                "connection is missing (a connection id, or null for the agent's own events)"
                    .into(),
            ))
        }
        // The agent's own events are the stream with connection "" (record.rs).
        Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.is_empty() => String::new(),
        Some(Value::String(s)) => {
            if !scope.connections.iter().any(|c| c == s) {
                return Err(with_id(format!(
                    "unknown connection {}: not one of this agent's connections",
                    shown(s)
                )));
            }
            s.clone()
        }
        Some(other) => {
            return Err(with_id(format!(
                "connection must be a string or null, found {}",
                describe(other)
            )))
        }
    };
    if connection.is_empty() && kind != Kind::Event {
        return Err(with_id(format!(
            "connection null means the agent's own events, which are kind \"event\", not \"{kind}\""
        )));
    }

    match fields.get("epoch") {
        None | Some(Value::Null) => {
            return Err(with_id(format!(
                "epoch is missing: the buffer's epoch is {}",
                scope.epoch
            )))
        }
        Some(Value::String(s)) if s == scope.epoch => {}
        Some(Value::String(_)) => {
            return Err(with_id(format!(
                "another epoch: the buffer's epoch is {} (seqs of another epoch are gone)",
                scope.epoch
            )))
        }
        Some(other) => {
            return Err(with_id(format!(
                "epoch must be a string, found {}; the buffer's epoch is {}",
                describe(other),
                scope.epoch
            )))
        }
    }

    let from_seq = seq(&fields, "from_seq").map_err(&with_id)?;
    let to_seq = seq(&fields, "to_seq").map_err(&with_id)?;
    if to_seq < from_seq {
        return Err(with_id(format!(
            "to_seq {to_seq} is before from_seq {from_seq}"
        )));
    }
    let request = Request {
        request_id: request_id.clone(),
        stream: StreamKey::new(connection, kind),
        from_seq,
        to_seq,
    };
    if request.len() > scope.max_records {
        return Err(with_id(format!(
            "range of {} records is more than the {} one request may ask for (mqtt.replay_max_records); ask in parts",
            request.len(),
            scope.max_records
        )));
    }
    Ok(request)
}

const KINDS: &str = "tag, batch, recipe, oee, downtime or event";

/// The id, or the refusal: `request_id` in it is `Some` only when the field
/// is a string (an empty or over-long one is echoed so the consumer can still
/// match the answer; the payload bound keeps it small).
fn request_id(fields: &Map<String, Value>) -> Result<String, Refusal> {
    let refuse = |request_id: Option<String>, error: String| Refusal { request_id, error };
    match fields.get("request_id") {
        None | Some(Value::Null) => Err(refuse(None, "request_id is missing".into())),
        Some(Value::String(s)) if s.is_empty() => Err(refuse(
            Some(s.clone()),
            "request_id must not be empty".into(),
        )),
        Some(Value::String(s)) if s.len() > MAX_REQUEST_ID_BYTES => Err(refuse(
            Some(s.clone()),
            format!(
                "request_id is {} bytes, at most {MAX_REQUEST_ID_BYTES} are allowed",
                s.len()
            ),
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(refuse(
            None,
            format!("request_id must be a string, found {}", describe(other)),
        )),
    }
}

/// `from_seq` / `to_seq`: a whole number from 1 (the first seq of a stream)
/// to the largest seq the buffer can hold.
fn seq(fields: &Map<String, Value>, key: &str) -> Result<u64, String> {
    let value = match fields.get(key) {
        None | Some(Value::Null) => return Err(format!("{key} is missing")),
        Some(v) => v,
    };
    match value.as_u64() {
        Some(0) => Err(format!("{key} must be at least 1: seqs start at 1")),
        Some(n) if n > MAX_SEQ => Err(format!("{key} {n} is larger than any seq ({MAX_SEQ})")),
        Some(n) => Ok(n),
        None => Err(format!(
            "{key} must be a whole number of at least 1, found {}",
            match value {
                Value::Number(n) if n.is_i64() => "a negative number",
                Value::Number(_) => "a fraction or an out-of-range number",
                other => describe(other),
            }
        )),
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A user-provided string as an error shows it: quoted and escaped, cut to
/// its first [`SHOWN_CHARS`] characters.
fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
    }
}

/// The result message, published on `{root}/commands/replay/result`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// None only for a request whose id could not be read.
    pub request_id: Option<String>,
    pub replayed: u64,
    /// Ranges of the request the buffer no longer has, ascending, merged.
    pub missing: Vec<(u64, u64)>,
    /// Set for a refused request (nothing was replayed).
    pub error: Option<String>,
}

impl Outcome {
    pub fn refused(r: &Refusal) -> Outcome {
        Outcome {
            request_id: r.request_id.clone(),
            replayed: 0,
            missing: Vec::new(),
            error: Some(r.error.clone()),
        }
    }

    /// The answer to a request that ran to its end.
    pub fn finished(request: &Request, gaps: Gaps) -> Outcome {
        let (replayed, missing) = gaps.finish();
        Outcome {
            request_id: Some(request.request_id.clone()),
            replayed,
            missing,
            error: None,
        }
    }

    /// Compact JSON, fields always present (`null` where unset) so
    /// consumers need not tell a missing field from an empty one.
    ///
    /// Written by hand in the documented field order: a `serde_json::Value`
    /// sorts its keys, and `to_vec` returns a `Result` that cannot fail here.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(64 + 24 * self.missing.len());
        out.push_str("{\"request_id\":");
        out.push_str(&json_string_or_null(self.request_id.as_deref()));
        // Writing into a String cannot fail.
        let _ = write!(out, ",\"replayed\":{},\"missing\":[", self.replayed);
        for (i, (a, b)) in self.missing.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(out, "{sep}[{a},{b}]");
        }
        out.push_str("],\"error\":");
        out.push_str(&json_string_or_null(self.error.as_deref()));
        out.push('}');
        out.into_bytes()
    }
}

/// A JSON string literal (escaped by serde_json's Display), or `null`.
fn json_string_or_null(s: Option<&str>) -> String {
    match s {
        Some(s) => Value::String(s.to_owned()).to_string(),
        None => "null".to_owned(),
    }
}

/// The missing ranges of a replay, computed while its records are read back
/// in seq order, without keeping anything per record.
///
/// At most [`MAX_MISSING_RANGES`] ranges are kept: when one more would be
/// needed, the last range is extended to `to_seq` instead and stays so. The
/// result then over-reports: that last range may include records that were
/// replayed after all (a consumer asking again from its start gets them).
/// `replayed` stays exact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gaps {
    from_seq: u64,
    to_seq: u64,
    /// The next seq to look for; meaningful while `!done`.
    next: u64,
    done: bool,
    replayed: u64,
    missing: Vec<(u64, u64)>,
    /// The ranges hit [`MAX_MISSING_RANGES`]; the last one runs to `to_seq`.
    capped: bool,
}

impl Gaps {
    /// `from_seq > to_seq` is an empty range, done from the start.
    pub fn new(from_seq: u64, to_seq: u64) -> Gaps {
        Gaps {
            from_seq,
            to_seq,
            next: from_seq,
            done: from_seq > to_seq,
            replayed: 0,
            missing: Vec::new(),
            capped: false,
        }
    }

    /// A record with this seq was found (seqs strictly increasing;
    /// out-of-range or non-increasing seqs are ignored).
    ///
    /// Ignored rather than refused: a read that returns a record twice or
    /// one outside the range must neither count it twice nor corrupt the
    /// ranges, and there is nothing the caller could do about it.
    pub fn found(&mut self, seq: u64) {
        if self.done || seq < self.next || seq > self.to_seq {
            return;
        }
        if seq > self.next {
            self.add_missing(self.next, seq - 1);
        }
        self.replayed += 1;
        self.advance_past(seq);
    }

    /// The next seq still to look for (from_seq at start; to_seq+1 when done).
    ///
    /// Saturates at `u64::MAX` for a range ending there; [`Gaps::done`] says
    /// which it is.
    pub fn next(&self) -> u64 {
        if self.done {
            self.to_seq.saturating_add(1).max(self.from_seq)
        } else {
            self.next
        }
    }

    /// Everything up to `seq` has been looked at (a read returned nothing
    /// more up to there): the seqs from [`Gaps::next`] to `seq` are missing.
    /// A `seq` before `next` changes nothing.
    pub fn looked_up_to(&mut self, seq: u64) {
        if self.done || seq < self.next {
            return;
        }
        let end = seq.min(self.to_seq);
        self.add_missing(self.next, end);
        self.advance_past(end);
    }

    pub fn done(&self) -> bool {
        self.done
    }

    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// Missing ranges so far, merged, ascending; `finish` treats the rest of
    /// the range as missing.
    pub fn finish(mut self) -> (u64, Vec<(u64, u64)>) {
        if !self.done {
            self.add_missing(self.next, self.to_seq);
        }
        (self.replayed, self.missing)
    }

    fn advance_past(&mut self, seq: u64) {
        if seq >= self.to_seq {
            self.done = true;
        } else {
            self.next = seq + 1;
        }
    }

    fn add_missing(&mut self, a: u64, b: u64) {
        if self.capped {
            return;
        }
        if let Some(last) = self.missing.last_mut() {
            if last.1.checked_add(1) == Some(a) {
                last.1 = b;
                return;
            }
        }
        if self.missing.len() < MAX_MISSING_RANGES {
            self.missing.push((a, b));
        } else if let Some(last) = self.missing.last_mut() {
            last.1 = self.to_seq;
            self.capped = true;
        }
    }
}

/// Token bucket for replayed records: a replay sends at most `rate_per_s`
/// records a second on average and `burst` at once, so a request (or many)
/// cannot crowd live data off the uplink. Time is passed in, which makes it
/// testable without sleeping.
///
/// Counts in token-nanoseconds (one record = 10^9), so any rate refills
/// exactly, without rounding drift between calls.
#[derive(Clone, Debug)]
pub struct Bucket {
    rate_per_s: u64,
    burst: u64,
    /// Tokens times 10^9.
    level: u128,
    /// The last time the level was brought up to date.
    at: Instant,
}

const NANOS: u128 = 1_000_000_000;

impl Bucket {
    /// Starts full. A rate or burst of 0 is taken as 1: a bucket that never
    /// fills would stall a replay forever instead of slowing it down.
    pub fn new(rate_per_s: u64, burst: u64, now: Instant) -> Bucket {
        let burst = burst.max(1);
        Bucket {
            rate_per_s: rate_per_s.max(1),
            burst,
            level: u128::from(burst) * NANOS,
            at: now,
        }
    }

    /// Records that may be sent now (refills by elapsed time, capped at burst).
    ///
    /// A `now` earlier than a previous one (the caller mixed up its
    /// instants) refills nothing and is not remembered.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.level = self.level_at(now);
        if now > self.at {
            self.at = now;
        }
        whole(self.level)
    }

    /// Takes `n` records' worth; more than is available empties the bucket
    /// (no debt), so one oversized take cannot block the replay for long.
    pub fn take(&mut self, n: u64) {
        self.level = self.level.saturating_sub(u128::from(n) * NANOS);
    }

    /// When at least `n` (capped at burst) will be available.
    ///
    /// Rounded up to the nanosecond, so `available` at that instant gives at
    /// least `n`; `now` itself when they are available already. A `now`
    /// before the bucket's last update counts from that update, so a caller
    /// that waits until the answer is never woken early.
    pub fn ready_at(&self, n: u64, now: Instant) -> Instant {
        let need = u128::from(n.min(self.burst)) * NANOS;
        let level = self.level_at(now);
        if level >= need {
            return now;
        }
        let base = now.max(self.at);
        let wait_ns = (need - level).div_ceil(u128::from(self.rate_per_s));
        let wait = Duration::from_nanos(u64::try_from(wait_ns).unwrap_or(u64::MAX));
        // Only a wait of centuries could overflow an Instant.
        base.checked_add(wait)
            .or_else(|| base.checked_add(Duration::from_secs(86_400)))
            .unwrap_or(base)
    }

    fn level_at(&self, now: Instant) -> u128 {
        let cap = u128::from(self.burst) * NANOS;
        let elapsed = now.saturating_duration_since(self.at).as_nanos();
        self.level
            .saturating_add(elapsed.saturating_mul(u128::from(self.rate_per_s)))
            .min(cap)
    }
}

fn whole(level: u128) -> u64 {
    u64::try_from(level / NANOS).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const EPOCH: &str = "b3c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5";

    fn connections() -> Vec<String> {
        vec!["deltav-line1".into(), "optomes-1".into()]
    }

    fn scope(connections: &[String]) -> Scope<'_> {
        Scope {
            epoch: EPOCH,
            connections,
            max_records: 1000,
        }
    }

    fn valid() -> Value {
        json!({
            "request_id": "r-1",
            "connection": "deltav-line1",
            "kind": "tag",
            "epoch": EPOCH,
            "from_seq": 41,
            "to_seq": 50,
        })
    }

    /// `valid()` with `key` set to `value` (or removed for `None`).
    fn with(key: &str, value: Option<Value>) -> Vec<u8> {
        let mut v = valid();
        let Value::Object(m) = &mut v else {
            unreachable!()
        };
        match value {
            Some(x) => m.insert(key.into(), x),
            None => m.remove(key),
        };
        v.to_string().into_bytes()
    }

    fn parse_ok(payload: &[u8]) -> Request {
        let conns = connections();
        match parse(payload, &scope(&conns)) {
            Ok(r) => r,
            Err(e) => panic!("refused: {e:?}"),
        }
    }

    fn refused(payload: &[u8]) -> Refusal {
        let conns = connections();
        match parse(payload, &scope(&conns)) {
            Ok(r) => panic!("accepted: {r:?}"),
            Err(e) => e,
        }
    }

    /// Refused with the id echoed and an error containing `needle`.
    fn refused_with(payload: &[u8], needle: &str) {
        let r = refused(payload);
        assert_eq!(r.request_id.as_deref(), Some("r-1"), "{r:?}");
        assert!(r.error.contains(needle), "{:?} lacks {needle:?}", r.error);
    }

    #[test]
    fn parses_a_full_request() {
        let r = parse_ok(&with("ignored", None));
        assert_eq!(
            r,
            Request {
                request_id: "r-1".into(),
                stream: StreamKey::new("deltav-line1", Kind::Tag),
                from_seq: 41,
                to_seq: 50,
            }
        );
        assert_eq!(r.len(), 10);
        assert!(!r.is_empty());
        let one = parse_ok(&with("to_seq", Some(json!(41))));
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn every_kind_parses() {
        for kind in Kind::ALL {
            let r = parse_ok(&with("kind", Some(json!(kind.as_str()))));
            assert_eq!(r.stream, StreamKey::new("deltav-line1", kind));
        }
    }

    #[test]
    fn null_or_empty_connection_is_the_agents_events() {
        let mut v = valid();
        v["kind"] = json!("event");
        v["connection"] = Value::Null;
        let r = parse_ok(v.to_string().as_bytes());
        assert_eq!(r.stream, StreamKey::new("", Kind::Event));
        v["connection"] = json!("");
        let r = parse_ok(v.to_string().as_bytes());
        assert_eq!(r.stream, StreamKey::new("", Kind::Event));
        // A connection's own events are a stream of their own.
        v["connection"] = json!("optomes-1");
        let r = parse_ok(v.to_string().as_bytes());
        assert_eq!(r.stream, StreamKey::new("optomes-1", Kind::Event));
    }

    #[test]
    fn null_connection_is_refused_for_other_kinds() {
        refused_with(&with("connection", Some(Value::Null)), "kind \"event\"");
        refused_with(&with("connection", Some(json!(""))), "not \"tag\"");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r = parse_ok(&with("trace", Some(json!({"deep": [1, 2, {"x": null}]}))));
        assert_eq!(r.request_id, "r-1");
    }

    #[test]
    fn payload_over_4096_bytes_is_refused_before_parsing() {
        // Valid JSON of exactly the limit passes...
        let base = with("pad", Some(json!("")));
        let pad = MAX_REQUEST_BYTES - base.len();
        let at_limit = with("pad", Some(json!("x".repeat(pad))));
        assert_eq!(at_limit.len(), MAX_REQUEST_BYTES);
        parse_ok(&at_limit);
        // ...one byte more does not, and the id is not read.
        let over = with("pad", Some(json!("x".repeat(pad + 1))));
        let r = refused(&over);
        assert_eq!(r.request_id, None);
        assert!(
            r.error.contains("too large") && r.error.contains("4096"),
            "{r:?}"
        );
        // Not even looked at: garbage of that size says the same.
        let r = refused(&[b'{'; MAX_REQUEST_BYTES + 1]);
        assert!(r.error.contains("too large"), "{r:?}");
    }

    #[test]
    fn invalid_json_is_refused_without_an_id() {
        let payloads: [&[u8]; 6] = [
            b"",
            b"{",
            b"{\"request_id\":\"r-1\"",
            b"not json",
            b"{\"request_id\":\"r-1\"} trailing",
            b"{\"request_id\":\"\xff\xfe\"}",
        ];
        for payload in payloads {
            let r = refused(payload);
            assert_eq!(r.request_id, None, "{payload:?}");
            assert!(r.error.starts_with("invalid JSON"), "{r:?}");
        }
    }

    #[test]
    fn deeply_nested_json_is_refused_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
        let r = refused(deep.as_bytes());
        assert!(r.error.starts_with("invalid JSON"), "{r:?}");
    }

    #[test]
    fn not_an_object_is_refused() {
        for (payload, found) in [
            ("[1,2]", "an array"),
            ("\"r-1\"", "a string"),
            ("42", "a number"),
            ("null", "null"),
            ("true", "a boolean"),
        ] {
            let r = refused(payload.as_bytes());
            assert_eq!(r.request_id, None);
            assert_eq!(r.error, format!("expected a JSON object, found {found}"));
        }
    }

    #[test]
    fn request_id_rules() {
        let r = refused(&with("request_id", None));
        assert_eq!(r.request_id, None);
        assert_eq!(r.error, "request_id is missing");

        let r = refused(&with("request_id", Some(Value::Null)));
        assert_eq!(
            (r.request_id, r.error.as_str()),
            (None, "request_id is missing")
        );

        let r = refused(&with("request_id", Some(json!(7))));
        assert_eq!(r.request_id, None);
        assert_eq!(r.error, "request_id must be a string, found a number");

        let r = refused(&with("request_id", Some(json!(""))));
        assert_eq!(r.request_id.as_deref(), Some(""));
        assert_eq!(r.error, "request_id must not be empty");

        let long = "i".repeat(MAX_REQUEST_ID_BYTES + 1);
        let r = refused(&with("request_id", Some(json!(long))));
        assert_eq!(
            r.request_id.as_deref(),
            Some(long.as_str()),
            "echoed for matching"
        );
        assert!(
            r.error.contains("129 bytes") && r.error.contains("128"),
            "{r:?}"
        );
        assert!(!r.error.contains(&long[..64]), "{r:?}");

        let at_limit = "i".repeat(MAX_REQUEST_ID_BYTES);
        assert_eq!(
            parse_ok(&with("request_id", Some(json!(at_limit)))).request_id,
            at_limit
        );
        // Bytes, not characters: 43 three-byte characters are 129 bytes.
        let wide = "€".repeat(43);
        assert_eq!(
            refused(&with("request_id", Some(json!(wide)))).request_id,
            Some(wide)
        );
    }

    #[test]
    fn later_refusals_carry_the_request_id() {
        let r = refused(&with("kind", Some(json!("nope"))));
        assert_eq!(r.request_id.as_deref(), Some("r-1"));
        assert_eq!(Outcome::refused(&r).request_id.as_deref(), Some("r-1"));
    }

    #[test]
    fn unknown_connection_is_refused() {
        refused_with(
            &with("connection", Some(json!("deltav-line9"))),
            "unknown connection \"deltav-line9\"",
        );
        refused_with(
            &with("connection", Some(json!("DELTAV-LINE1"))),
            "unknown connection",
        );
        refused_with(
            &with("connection", Some(json!(3))),
            "connection must be a string or null, found a number",
        );
        refused_with(&with("connection", None), "connection is missing");
        // No configured connections: only the agent's events can be asked for.
        let none: Vec<String> = Vec::new();
        let r = parse(
            &with("connection", Some(json!("deltav-line1"))),
            &scope(&none),
        );
        assert!(r.is_err());
    }

    #[test]
    fn kind_must_be_one_of_six() {
        refused_with(
            &with("kind", Some(json!("alarm"))),
            "unknown kind \"alarm\": expected tag, batch, recipe, oee, downtime or event",
        );
        refused_with(&with("kind", Some(json!("Tag"))), "unknown kind \"Tag\"");
        refused_with(&with("kind", None), "kind is missing");
        refused_with(&with("kind", Some(json!(["tag"]))), "kind must be a string");
    }

    #[test]
    fn another_epoch_is_refused_naming_the_buffers() {
        let expected = format!("another epoch: the buffer's epoch is {EPOCH}");
        refused_with(&with("epoch", Some(json!("0123"))), &expected);
        refused_with(
            &with("epoch", None),
            &format!("epoch is missing: the buffer's epoch is {EPOCH}"),
        );
        refused_with(&with("epoch", Some(json!(1))), "epoch must be a string");
        // Epochs compare exactly.
        refused_with(
            &with("epoch", Some(json!(EPOCH.to_uppercase()))),
            "another epoch",
        );
    }

    #[test]
    fn seqs_must_be_whole_numbers_from_1() {
        for key in ["from_seq", "to_seq"] {
            refused_with(&with(key, None), &format!("{key} is missing"));
            refused_with(&with(key, Some(Value::Null)), &format!("{key} is missing"));
            refused_with(
                &with(key, Some(json!(0))),
                &format!("{key} must be at least 1: seqs start at 1"),
            );
            refused_with(&with(key, Some(json!(-3))), "found a negative number");
            refused_with(&with(key, Some(json!(42.5))), "found a fraction");
            refused_with(&with(key, Some(json!(45.0))), "found a fraction");
            refused_with(&with(key, Some(json!("45"))), "found a string");
            refused_with(&with(key, Some(json!(u64::MAX))), "is larger than any seq");
        }
        // Beyond u64: serde_json reads it as a float.
        let mut text = String::from_utf8(with("from_seq", Some(json!(1)))).unwrap();
        text = text.replace("\"from_seq\":1", "\"from_seq\":99999999999999999999999");
        refused_with(text.as_bytes(), "out-of-range");
    }

    #[test]
    fn to_seq_before_from_seq_is_refused() {
        refused_with(
            &with("to_seq", Some(json!(40))),
            "to_seq 40 is before from_seq 41",
        );
    }

    #[test]
    fn range_longer_than_the_limit_is_refused() {
        let conns = connections();
        let mut v = valid();
        v["from_seq"] = json!(1);
        v["to_seq"] = json!(1000);
        parse_ok(v.to_string().as_bytes());
        v["to_seq"] = json!(1001);
        let r = parse(v.to_string().as_bytes(), &scope(&conns)).unwrap_err();
        assert_eq!(r.request_id.as_deref(), Some("r-1"));
        assert!(r.error.contains("1001 records"), "{r:?}");
        assert!(r.error.contains("1000"), "{r:?}");
        assert!(r.error.contains("mqtt.replay_max_records"), "{r:?}");
        // The widest range that exists does not overflow the length.
        v["to_seq"] = json!(MAX_SEQ);
        let wide = Scope {
            max_records: u64::MAX,
            ..scope(&conns)
        };
        let r = parse(v.to_string().as_bytes(), &wide).unwrap();
        assert_eq!(r.len(), MAX_SEQ);
    }

    #[test]
    fn errors_never_echo_more_than_a_short_prefix() {
        let marker = "A".repeat(65);
        let long = format!("{marker}{}", "B".repeat(2000));
        for key in ["connection", "kind", "epoch", "from_seq", "request_id"] {
            let r = refused(&with(key, Some(json!(long))));
            assert!(!r.error.contains(&marker), "{key}: {:?}", r.error);
            assert!(r.error.len() < 400, "{key}: {:?}", r.error);
        }
        // Cut on a character boundary, never inside one.
        let r = refused(&with("kind", Some(json!("é".repeat(100)))));
        assert!(
            r.error
                .contains(&format!("\"{}\"...", "é".repeat(SHOWN_CHARS))),
            "{r:?}"
        );
        // Control characters are escaped, not passed on.
        let r = refused(&with("kind", Some(json!("a\nb\u{1b}[31m"))));
        assert!(
            !r.error.contains('\n') && !r.error.contains('\u{1b}'),
            "{r:?}"
        );
    }

    #[test]
    fn refusal_displays_its_error() {
        let r = refused(&with("to_seq", Some(json!(1))));
        assert_eq!(r.to_string(), r.error);
    }

    #[test]
    fn outcome_encodes_compact_json() {
        let ok = Outcome {
            request_id: Some("r-1".into()),
            replayed: 7,
            missing: vec![(41, 42), (45, 45)],
            error: None,
        };
        assert_eq!(
            String::from_utf8(ok.encode()).unwrap(),
            r#"{"request_id":"r-1","replayed":7,"missing":[[41,42],[45,45]],"error":null}"#
        );
        let none = Outcome {
            request_id: None,
            replayed: 0,
            missing: Vec::new(),
            error: None,
        };
        assert_eq!(
            String::from_utf8(none.encode()).unwrap(),
            r#"{"request_id":null,"replayed":0,"missing":[],"error":null}"#
        );
    }

    #[test]
    fn refused_outcome_has_the_error_and_nothing_else() {
        let r = refused(b"[]");
        let o = Outcome::refused(&r);
        assert_eq!(
            o,
            Outcome {
                request_id: None,
                replayed: 0,
                missing: Vec::new(),
                error: Some("expected a JSON object, found an array".into()),
            }
        );
        assert_eq!(
            String::from_utf8(o.encode()).unwrap(),
            r#"{"request_id":null,"replayed":0,"missing":[],"error":"expected a JSON object, found an array"}"#
        );
        // Quotes in an echoed prefix stay valid JSON.
        let o = Outcome::refused(&refused(&with("kind", Some(json!("a\"b")))));
        let back: Value = serde_json::from_slice(&o.encode()).unwrap();
        assert_eq!(back["request_id"], "r-1");
        assert!(back["error"].as_str().unwrap().contains("a\\\"b"));
    }

    #[test]
    fn finished_outcome_takes_the_gaps() {
        let r = parse_ok(&valid().to_string().into_bytes());
        let mut g = Gaps::new(r.from_seq, r.to_seq);
        g.found(41);
        g.found(44);
        g.looked_up_to(47);
        g.found(50);
        let o = Outcome::finished(&r, g);
        assert_eq!(o.request_id.as_deref(), Some("r-1"));
        assert_eq!((o.replayed, o.error), (3, None));
        assert_eq!(o.missing, vec![(42, 43), (45, 49)]);
    }

    #[test]
    fn gaps_all_found() {
        let mut g = Gaps::new(5, 9);
        assert_eq!((g.next(), g.done(), g.replayed()), (5, false, 0));
        for s in 5..=9 {
            g.found(s);
            assert_eq!(g.next(), s + 1);
        }
        assert!(g.done());
        assert_eq!(g.finish(), (5, vec![]));
    }

    #[test]
    fn gaps_none_found() {
        assert_eq!(Gaps::new(5, 9).finish(), (0, vec![(5, 9)]));
        let mut g = Gaps::new(5, 9);
        g.looked_up_to(100);
        assert!(g.done());
        assert_eq!(g.next(), 10);
        assert_eq!(g.finish(), (0, vec![(5, 9)]));
    }

    #[test]
    fn gaps_at_start_middle_and_end() {
        let mut g = Gaps::new(1, 20);
        g.found(3);
        g.found(4);
        g.found(8);
        g.found(18);
        assert_eq!(g.replayed(), 4);
        assert_eq!(g.next(), 19);
        assert!(!g.done());
        assert_eq!(g.finish(), (4, vec![(1, 2), (5, 7), (9, 17), (19, 20)]));
    }

    #[test]
    fn gaps_merge_across_looked_up_to() {
        let mut g = Gaps::new(1, 20);
        g.found(1);
        g.looked_up_to(5);
        assert_eq!(g.next(), 6);
        g.looked_up_to(7);
        g.found(10);
        g.looked_up_to(10); // nothing new: 10 was found
        g.looked_up_to(3); // behind: ignored
        g.found(11);
        assert_eq!(g.finish(), (3, vec![(2, 9), (12, 20)]));
    }

    #[test]
    fn gaps_ignore_repeats_and_seqs_out_of_range() {
        let mut g = Gaps::new(10, 15);
        g.found(9);
        g.found(0);
        assert_eq!(g.next(), 10);
        g.found(11);
        g.found(11);
        g.found(10);
        g.found(16);
        g.found(u64::MAX);
        assert_eq!(g.replayed(), 1);
        g.found(15);
        assert!(g.done());
        g.found(15);
        g.looked_up_to(100);
        assert_eq!(g.finish(), (2, vec![(10, 10), (12, 14)]));
    }

    #[test]
    fn gaps_of_an_empty_range_are_done_at_once() {
        let mut g = Gaps::new(9, 5);
        assert!(g.done());
        g.found(7);
        assert_eq!(g.finish(), (0, vec![]));
    }

    #[test]
    fn gaps_at_the_top_of_u64_do_not_overflow() {
        let mut g = Gaps::new(u64::MAX - 2, u64::MAX);
        g.found(u64::MAX - 1);
        g.found(u64::MAX);
        assert!(g.done());
        assert_eq!(g.next(), u64::MAX);
        assert_eq!(g.finish(), (2, vec![(u64::MAX - 2, u64::MAX - 2)]));
        let mut g = Gaps::new(1, u64::MAX);
        g.looked_up_to(u64::MAX);
        assert!(g.done());
        assert_eq!(g.finish(), (0, vec![(1, u64::MAX)]));
    }

    #[test]
    fn missing_ranges_are_capped_and_the_last_runs_to_the_end() {
        // Every other record gone: 50_000 gaps without the cap.
        let mut g = Gaps::new(1, 100_000);
        for s in (2..=100_000).step_by(2) {
            g.found(s);
        }
        assert_eq!(g.replayed(), 50_000, "replayed stays exact");
        let (replayed, missing) = g.finish();
        assert_eq!(replayed, 50_000);
        assert_eq!(missing.len(), MAX_MISSING_RANGES);
        assert_eq!(missing[0], (1, 1));
        assert_eq!(missing[MAX_MISSING_RANGES - 2], (1997, 1997));
        assert_eq!(missing[MAX_MISSING_RANGES - 1], (1999, 100_000));

        // Exactly at the cap nothing is extended.
        let mut g = Gaps::new(1, 2 * MAX_MISSING_RANGES as u64);
        for s in (2..=2 * MAX_MISSING_RANGES as u64).step_by(2) {
            g.found(s);
        }
        let (_, missing) = g.finish();
        assert_eq!(missing.len(), MAX_MISSING_RANGES);
        let last = 2 * MAX_MISSING_RANGES as u64 - 1;
        assert_eq!(missing[MAX_MISSING_RANGES - 1], (last, last));
    }

    /// One step of a replay read, as the proptest drives it.
    #[derive(Clone, Debug)]
    enum Step {
        Found(u64),
        LookedUpTo(u64),
    }

    fn step(max: u64) -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..=max).prop_map(Step::Found),
            1 => (0..=max).prop_map(Step::LookedUpTo),
        ]
    }

    proptest! {
        /// Against a model that keeps every seq: replayed is the number of
        /// accepted finds, missing is exactly the rest of the range, merged
        /// and ascending, and `next`/`done` follow the frontier.
        #[test]
        fn gaps_match_a_model(
            from in 1u64..60,
            len in 0u64..120,
            steps in proptest::collection::vec(step(200), 0..80),
        ) {
            let to = from + len;
            let mut g = Gaps::new(from, to);
            let mut frontier = from; // next seq to look for
            let mut found = std::collections::BTreeSet::new();
            for s in steps {
                match s {
                    Step::Found(seq) => {
                        g.found(seq);
                        if seq >= frontier && seq <= to {
                            found.insert(seq);
                            frontier = seq + 1;
                        }
                    }
                    Step::LookedUpTo(seq) => {
                        g.looked_up_to(seq);
                        if seq >= frontier {
                            frontier = seq.min(to) + 1;
                        }
                    }
                }
                prop_assert_eq!(g.next(), frontier);
                prop_assert_eq!(g.done(), frontier > to);
                prop_assert_eq!(g.replayed(), found.len() as u64);
            }
            let (replayed, missing) = g.finish();
            prop_assert_eq!(replayed, found.len() as u64);
            let mut expected: Vec<(u64, u64)> = Vec::new();
            for seq in (from..=to).filter(|s| !found.contains(s)) {
                match expected.last_mut() {
                    Some(last) if last.1 + 1 == seq => last.1 = seq,
                    _ => expected.push((seq, seq)),
                }
            }
            prop_assert_eq!(missing, expected);
        }

        /// However the steps go, the ranges stay bounded, ascending,
        /// disjoint and inside the request.
        #[test]
        fn capped_gaps_stay_well_formed(
            seqs in proptest::collection::btree_set(1u64..6000, 0..3000),
        ) {
            let mut g = Gaps::new(1, 6000);
            for s in &seqs {
                g.found(*s);
            }
            let (replayed, missing) = g.finish();
            prop_assert_eq!(replayed, seqs.len() as u64);
            prop_assert!(missing.len() <= MAX_MISSING_RANGES);
            for w in missing.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0, "{:?}", w);
            }
            for (a, b) in &missing {
                prop_assert!(1 <= *a && a <= b && *b <= 6000);
            }
            // Every seq not found is reported missing (over-reporting is
            // allowed only past the cap).
            for s in (1..=6000).filter(|s| !seqs.contains(s)) {
                prop_assert!(missing.iter().any(|(a, b)| *a <= s && s <= *b), "{}", s);
            }
        }
    }

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn bucket_starts_full_and_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 50, t0);
        assert_eq!(b.available(t0), 50);
        b.take(50);
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.available(at(t0, 100)), 10);
        assert_eq!(b.available(at(t0, 250)), 25);
        b.take(5);
        assert_eq!(b.available(at(t0, 250)), 20);
        // Capped at the burst however long it idles.
        assert_eq!(b.available(at(t0, 60_000)), 50);
        assert_eq!(b.available(t0 + Duration::from_secs(86_400 * 365)), 50);
    }

    #[test]
    fn bucket_keeps_fractions_between_calls() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3, 10, t0);
        b.take(10);
        // A third of a record every 111 ms adds up: nothing is lost to rounding.
        let mut t = t0;
        for _ in 0..9 {
            t += Duration::from_nanos(111_111_112);
            b.available(t);
        }
        assert_eq!(b.available(t), 3);
        let mut b = Bucket::new(3, 10, t0);
        b.take(10);
        assert_eq!(b.available(at(t0, 333)), 0, "not before its time");
        assert_eq!(b.available(at(t0, 334)), 1);
    }

    #[test]
    fn bucket_taking_more_than_available_empties_it_without_debt() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 10, t0);
        b.take(1_000);
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.available(at(t0, 100)), 1);
        b.take(u64::MAX);
        assert_eq!(b.available(at(t0, 100)), 0);
    }

    #[test]
    fn bucket_ready_at() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 50, t0);
        assert_eq!(b.ready_at(50, t0), t0, "available already");
        assert_eq!(b.ready_at(0, t0), t0);
        b.take(50);
        assert_eq!(b.ready_at(1, t0), at(t0, 10));
        assert_eq!(b.ready_at(20, t0), at(t0, 200));
        // More than the burst waits for the burst, not forever.
        assert_eq!(b.ready_at(1_000_000, t0), at(t0, 500));
        // From a later instant, what has refilled meanwhile counts.
        assert_eq!(b.ready_at(20, at(t0, 150)), at(t0, 200));
        assert_eq!(b.ready_at(10, at(t0, 150)), at(t0, 150));
        // ready_at does not change the bucket.
        assert_eq!(b.available(t0), 0);
    }

    #[test]
    fn bucket_ignores_time_going_backwards() {
        let t0 = Instant::now();
        let later = at(t0, 1_000);
        let mut b = Bucket::new(10, 10, later);
        b.take(10);
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.ready_at(1, t0), at(t0, 1_100), "counted from `later`");
        assert_eq!(b.available(at(t0, 1_099)), 0);
        assert_eq!(b.available(at(t0, 1_100)), 1);
    }

    #[test]
    fn bucket_zero_rate_or_burst_is_one() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0, 0, t0);
        assert_eq!(b.available(t0), 1);
        b.take(1);
        assert_eq!(b.ready_at(5, t0), at(t0, 1_000));
        assert_eq!(b.available(at(t0, 1_000)), 1);
    }

    #[test]
    fn bucket_extremes_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = Bucket::new(u64::MAX, u64::MAX, t0);
        assert_eq!(b.available(t0), u64::MAX);
        b.take(u64::MAX);
        assert_eq!(b.available(at(t0, 1)), u64::MAX / 1_000);
        assert_eq!(b.available(at(t0, 1_000_000)), u64::MAX);
        let mut slow = Bucket::new(1, u64::MAX, t0);
        slow.take(u64::MAX);
        // Far beyond any real wait, but an instant, not a panic.
        assert!(slow.ready_at(u64::MAX, t0) > t0);
        assert_eq!(slow.available(t0 + Duration::from_secs(3)), 3);
    }

    proptest! {
        /// `ready_at` is exact: at that instant `n` (capped at burst) are
        /// available, a nanosecond before they are not.
        #[test]
        fn bucket_ready_at_is_when_available(
            rate in 1u64..5_000,
            burst in 1u64..500,
            taken in 0u64..600,
            n in 0u64..700,
            idle_ns in 0u64..2_000_000_000,
        ) {
            let t0 = Instant::now();
            let mut b = Bucket::new(rate, burst, t0);
            b.take(taken);
            let now = t0 + Duration::from_nanos(idle_ns);
            let ready = b.ready_at(n, now);
            prop_assert!(ready >= now);
            let want = n.min(burst);
            prop_assert!(b.clone().available(ready) >= want);
            if ready > now {
                let before = ready - Duration::from_nanos(1);
                prop_assert!(b.clone().available(before) < want);
            }
        }
    }
}
