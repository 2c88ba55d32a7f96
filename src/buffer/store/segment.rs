//! The stored form of a group of records of one stream: a *segment*. Pure
//! encoding and decoding, no database (the layout and why it is dense are
//! in the module doc of `buffer`).
//!
//! A segment blob is one format byte followed by one zstd frame of:
//!
//! ```text
//! varint  n                       records in the segment
//! n-1 ×   varint seq delta        ≥ 1; the first seq is the row's first_seq
//! n ×     zigzag varint ts delta  the first relative to 0
//! n ×     varint length           of each record's data
//!         data                    the records' JSON text, back to back
//! ```
//!
//! Columns rather than records: the deltas are nearly all alike and the
//! JSON of a stream repeats itself (tag names, node ids, keys), which is
//! what zstd turns into a few bytes per record. Seqs are stored relative to
//! the first, so a segment is encoded before its seqs are known (outside
//! the write transaction) and the row gives the base.

use std::io;

/// The only format so far: the columns above in one zstd frame.
const FORMAT_ZSTD: u8 = 1;
/// zstd level: 3 (zstd's default) measured ~15 % denser than 1 on tag
/// records at about the same speed per record here.
const LEVEL: i32 = 3;
/// A frame that claims to decode to more than this is not ours: the
/// largest segment the store writes is far smaller (see `MAX_TEXT`).
const MAX_DECODED: usize = 64 * 1024 * 1024;

/// Records per segment at most: bounds what one read decodes and what one
/// eviction takes at once.
pub const MAX_RECORDS: usize = 4096;
/// JSON text per segment at most (a single larger record still gets a
/// segment of its own).
pub const MAX_TEXT: usize = 256 * 1024;

/// One record of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub seq: i64,
    pub ts_ms: i64,
    pub data: &'a str,
}

/// A decoded segment: its records in seq order, one text buffer for all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    seqs: Vec<i64>,
    ts: Vec<i64>,
    /// End offset of each record's data in `text`.
    ends: Vec<usize>,
    text: String,
}

impl Segment {
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn get(&self, i: usize) -> Entry<'_> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Entry {
            seq: self.seqs[i],
            ts_ms: self.ts[i],
            data: &self.text[start..self.ends[i]],
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Entry<'_>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Index of `seq` (`Err`: where it would go).
    pub fn position(&self, seq: i64) -> Result<usize, usize> {
        self.seqs.binary_search(&seq)
    }

    /// Index of the first record with a seq above `seq`.
    pub fn after(&self, seq: i64) -> usize {
        self.seqs.partition_point(|&s| s <= seq)
    }

    pub fn seqs(&self) -> &[i64] {
        &self.seqs
    }
}

/// Encoder and decoder with their zstd contexts, kept for the life of the
/// store: a context costs about a megabyte to set up, a segment far less
/// to encode.
pub struct Codec {
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
    payload: Vec<u8>,
}

impl Codec {
    pub fn new() -> io::Result<Codec> {
        let mut compressor = zstd::bulk::Compressor::new(LEVEL)?;
        // Four bytes a segment: a flipped bit in a blob is then found by
        // the decoder instead of published as a wrong value.
        compressor.include_checksum(true)?;
        Ok(Codec {
            compressor,
            decompressor: zstd::bulk::Decompressor::new()?,
            payload: Vec::new(),
        })
    }

    /// Encodes `entries` (strictly increasing seqs, at least one).
    pub fn encode(&mut self, entries: &[Entry<'_>]) -> io::Result<Vec<u8>> {
        let p = &mut self.payload;
        p.clear();
        put_varint(p, entries.len() as u64);
        for pair in entries.windows(2) {
            let delta = pair[1].seq - pair[0].seq;
            if delta < 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "segment seqs not increasing: {} then {}",
                        pair[0].seq, pair[1].seq
                    ),
                ));
            }
            put_varint(p, delta as u64);
        }
        let mut prev = 0i64;
        for e in entries {
            put_varint(p, zigzag(e.ts_ms.wrapping_sub(prev)));
            prev = e.ts_ms;
        }
        for e in entries {
            put_varint(p, e.data.len() as u64);
        }
        for e in entries {
            p.extend_from_slice(e.data.as_bytes());
        }
        let frame = self.compressor.compress(p)?;
        let mut blob = Vec::with_capacity(frame.len() + 1);
        blob.push(FORMAT_ZSTD);
        blob.extend_from_slice(&frame);
        Ok(blob)
    }

    /// Decodes a blob whose row says its first seq is `first_seq`. Any
    /// inconsistency is an error naming it: the caller reports the file as
    /// corrupt.
    pub fn decode(&mut self, blob: &[u8], first_seq: i64) -> Result<Segment, String> {
        let (&format, frame) = blob.split_first().ok_or("empty segment")?;
        if format != FORMAT_ZSTD {
            return Err(format!("unknown segment format {format}"));
        }
        let size = match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(n)) if n as usize <= MAX_DECODED => n as usize,
            Ok(Some(n)) => return Err(format!("segment claims {n} bytes")),
            _ => return Err("segment frame has no valid size".into()),
        };
        let payload = self
            .decompressor
            .decompress(frame, size)
            .map_err(|e| format!("segment does not decompress: {e}"))?;
        parse(&payload, first_seq)
    }
}

fn parse(payload: &[u8], first_seq: i64) -> Result<Segment, String> {
    let mut r = Reader {
        buf: payload,
        at: 0,
    };
    let n = r.varint()? as usize;
    // Every record takes at least three bytes of columns.
    if n == 0 || n > payload.len() / 3 {
        return Err(format!(
            "segment claims {n} records in {} bytes",
            payload.len()
        ));
    }
    let mut seqs = Vec::with_capacity(n);
    seqs.push(first_seq);
    for _ in 1..n {
        let delta = r.varint()?;
        let prev = seqs[seqs.len() - 1];
        let seq = i64::try_from(delta)
            .ok()
            .filter(|d| *d >= 1)
            .and_then(|d| prev.checked_add(d))
            .ok_or("segment seq delta out of range")?;
        seqs.push(seq);
    }
    let mut ts = Vec::with_capacity(n);
    let mut prev = 0i64;
    for _ in 0..n {
        prev = prev.wrapping_add(unzigzag(r.varint()?));
        ts.push(prev);
    }
    let mut ends = Vec::with_capacity(n);
    let mut end = 0usize;
    for _ in 0..n {
        end = end
            .checked_add(r.varint()? as usize)
            .ok_or("segment lengths overflow")?;
        ends.push(end);
    }
    let rest = &payload[r.at..];
    if rest.len() != end {
        return Err(format!(
            "segment text is {} bytes, its lengths say {end}",
            rest.len()
        ));
    }
    let text = std::str::from_utf8(rest)
        .map_err(|e| format!("segment text is not UTF-8: {e}"))?
        .to_string();
    // A length may not cut a character in two either.
    if ends.iter().any(|&e| !text.is_char_boundary(e)) {
        return Err("segment lengths split a character".into());
    }
    Ok(Segment {
        seqs,
        ts,
        ends,
        text,
    })
}

/// Splits a stream's records (in seq order) into runs that each make one
/// segment: at most [`MAX_RECORDS`] records and [`MAX_TEXT`] of text,
/// except that a run always takes at least one record.
pub fn runs<T>(items: &[T], text_len: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut text = 0usize;
    for (i, item) in items.iter().enumerate() {
        let len = text_len(item);
        if i > start && (i - start >= MAX_RECORDS || text + len > MAX_TEXT) {
            out.push(&items[start..i]);
            start = i;
            text = 0;
        }
        text += len;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) struct Reader<'a> {
    pub buf: &'a [u8],
    pub at: usize,
}

impl Reader<'_> {
    pub fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.at)
                .ok_or("segment ends inside a number")?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("segment number too long".into())
    }

    pub fn done(&self) -> bool {
        self.at >= self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(texts: &[String], seqs: &[i64], ts: &[i64]) -> Vec<Entry<'static>> {
        texts
            .iter()
            .zip(seqs)
            .zip(ts)
            .map(|((t, &seq), &ts_ms)| Entry {
                seq,
                ts_ms,
                data: Box::leak(t.clone().into_boxed_str()),
            })
            .collect()
    }

    #[test]
    fn round_trips_seqs_times_and_text() {
        let texts: Vec<String> = (0..50)
            .map(|i| {
                format!(
                    "{{\"name\":\"T{}\",\"value\":{},\"ü\":\"ß\"}}",
                    i % 7,
                    i * 3
                )
            })
            .collect();
        let seqs: Vec<i64> = (0..50).map(|i| 1000 + i * 3 + (i % 3)).collect();
        let ts: Vec<i64> = (0..50)
            .map(|i| 1_764_000_000_000 - i * 17 + (i % 5) * 1000)
            .collect();
        let input = entries(&texts, &seqs, &ts);
        let mut codec = Codec::new().unwrap();
        let blob = codec.encode(&input).unwrap();
        let seg = codec.decode(&blob, 1000).unwrap();
        assert_eq!(seg.iter().collect::<Vec<_>>(), input);
        assert_eq!(seg.position(1000 + 4 * 3 + 1), Ok(4));
        assert_eq!(seg.after(1000), 1);
        assert_eq!(seg.after(0), 0);
        // The row's first seq is the base: the same blob under another base.
        let moved = codec.decode(&blob, 1).unwrap();
        assert_eq!(moved.get(0).seq, 1);
        assert_eq!(moved.get(49).seq - moved.get(0).seq, seqs[49] - seqs[0]);
    }

    #[test]
    fn refuses_what_it_did_not_write() {
        let mut codec = Codec::new().unwrap();
        let texts = vec!["{}".to_string(), "{\"a\":1}".to_string()];
        let blob = codec.encode(&entries(&texts, &[1, 2], &[5, 6])).unwrap();
        assert!(codec.decode(&[], 1).is_err());
        assert!(codec
            .decode(&[9, 1, 2], 1)
            .unwrap_err()
            .contains("format 9"));
        let mut cut = blob.clone();
        cut.truncate(blob.len() - 3);
        assert!(codec.decode(&cut, 1).is_err());
        let mut flipped = blob.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x55;
        assert!(codec.decode(&flipped, 1).is_err());
        let err = codec
            .encode(&entries(&texts, &[2, 2], &[5, 6]))
            .unwrap_err();
        assert!(err.to_string().contains("not increasing"));
    }

    #[test]
    fn runs_cap_records_and_text_but_never_split_a_record() {
        let sizes = vec![10usize; MAX_RECORDS + 5];
        let r = runs(&sizes, |s| *s);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len(), MAX_RECORDS);
        let big = vec![MAX_TEXT + 1, 1, MAX_TEXT / 2, MAX_TEXT / 2 + 1];
        let r = runs(&big, |s| *s);
        assert_eq!(r.iter().map(|r| r.len()).collect::<Vec<_>>(), [1, 2, 1]);
        assert!(runs(&Vec::<usize>::new(), |s| *s).is_empty());
    }

    #[test]
    fn zigzag_round_trips_extremes() {
        for v in [0, 1, -1, i64::MAX, i64::MIN, 1_764_000_000_000] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
