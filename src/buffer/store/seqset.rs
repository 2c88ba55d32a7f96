//! The seqs of a segment that are no longer pending (acknowledged, moved to
//! the dead letters, expired), kept with the segment's row until the last
//! one goes and the segment with it. Acks arrive in seq order nearly
//! always, so the set is a handful of ranges, stored as varint pairs.

use super::segment::{put_varint, Reader};

/// Sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqSet(Vec<(i64, i64)>);

impl SeqSet {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, seq: i64) -> bool {
        let i = self.0.partition_point(|&(_, last)| last < seq);
        self.0.get(i).is_some_and(|&(first, _)| first <= seq)
    }

    /// Adds `seq`; false if it was there already.
    pub fn insert(&mut self, seq: i64) -> bool {
        let i = self.0.partition_point(|&(_, last)| last < seq);
        if let Some(&(first, _)) = self.0.get(i) {
            if first <= seq {
                return false;
            }
        }
        let joins_left = i > 0 && self.0[i - 1].1 == seq - 1;
        let joins_right = self.0.get(i).is_some_and(|&(first, _)| first == seq + 1);
        match (joins_left, joins_right) {
            (true, true) => {
                self.0[i - 1].1 = self.0[i].1;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = seq,
            (false, true) => self.0[i].0 = seq,
            (false, false) => self.0.insert(i, (seq, seq)),
        }
        true
    }

    /// Removes `seq`; false if it was not there.
    pub fn remove(&mut self, seq: i64) -> bool {
        let i = self.0.partition_point(|&(_, last)| last < seq);
        let Some(&(first, last)) = self.0.get(i) else {
            return false;
        };
        if seq < first {
            return false;
        }
        match (first == seq, last == seq) {
            (true, true) => {
                self.0.remove(i);
            }
            (true, false) => self.0[i].0 = seq + 1,
            (false, true) => self.0[i].1 = seq - 1,
            (false, false) => {
                self.0[i].1 = seq - 1;
                self.0.insert(i + 1, (seq + 1, last));
            }
        }
        true
    }

    /// `first, length - 1` of each range, each first relative to the end
    /// of the range before (the first relative to `base`, the segment's
    /// first seq).
    pub fn encode(&self, base: i64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 3);
        let mut prev = base;
        for &(first, last) in &self.0 {
            put_varint(&mut out, (first - prev) as u64);
            put_varint(&mut out, (last - first) as u64);
            prev = last;
        }
        out
    }

    pub fn decode(bytes: &[u8], base: i64) -> Result<SeqSet, String> {
        let mut r = Reader { buf: bytes, at: 0 };
        let mut out = Vec::new();
        let mut prev = base;
        while !r.done() {
            let gap = i64::try_from(r.varint()?).map_err(|_| "gone set out of range")?;
            let span = i64::try_from(r.varint()?).map_err(|_| "gone set out of range")?;
            let first = prev.checked_add(gap).ok_or("gone set out of range")?;
            let last = first.checked_add(span).ok_or("gone set out of range")?;
            // Ranges after the first must leave a gap, or they would have
            // been one range.
            if !out.is_empty() && gap < 2 {
                return Err("gone set ranges overlap".into());
            }
            out.push((first, last));
            prev = last;
        }
        Ok(SeqSet(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any sequence of inserts and removes agrees with a plain set, and
        /// survives encoding.
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((any::<bool>(), 0i64..40), 0..200)) {
            let mut set = SeqSet::default();
            let mut model = std::collections::BTreeSet::new();
            for (add, seq) in ops {
                if add {
                    prop_assert_eq!(set.insert(seq), model.insert(seq));
                } else {
                    prop_assert_eq!(set.remove(seq), model.remove(&seq));
                }
                for s in -1..42 {
                    prop_assert_eq!(set.contains(s), model.contains(&s));
                }
                prop_assert!(set.0.windows(2).all(|w| w[0].1 + 1 < w[1].0));
                prop_assert_eq!(SeqSet::decode(&set.encode(0), 0).unwrap(), set.clone());
            }
        }
    }

    #[test]
    fn refuses_overlapping_ranges() {
        let mut bytes = Vec::new();
        for v in [0u64, 2, 1, 0] {
            put_varint(&mut bytes, v);
        }
        assert!(SeqSet::decode(&bytes, 10).is_err());
        assert!(SeqSet::decode(&[0x80], 10).is_err());
    }
}
