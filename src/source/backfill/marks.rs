//! What a connection with `backfill = "history"` knows per tag
//! (docs/backfill.md): the newest source timestamp it accepted, and the gaps
//! still to be read back from the server's history. Pure bookkeeping; the
//! driver applies it to every value it hands to the buffer, and the marks
//! that changed go into the same transaction as those values
//! ([`crate::buffer::TagMark`]), so after a kill -9 the agent knows exactly
//! what it accepted and what it still owes.
//!
//! The rules:
//! - a tag's first live value of a session opens the gap (last accepted,
//!   that value), both ends exclusive: the server's history fills it, the
//!   subscription delivered its end. If that first value is the very value
//!   accepted last (same source timestamp, nothing changed meanwhile), it is
//!   not emitted again;
//! - a gap longer than `backfill_max` is cut to its newest `backfill_max`,
//!   and the rest reported;
//! - a value read back is taken only inside its gap and after the values
//!   taken from it so far, so a value is never emitted twice (a server that
//!   repeats itself or returns more than asked is counted, not obeyed);
//! - a gap is read from where the last taken value left it: a restart in
//!   the middle of a backfill goes on without repeating or losing.

use std::collections::{HashMap, HashSet};

use crate::buffer::TagMark;

/// An open interval of source timestamps (ms), both ends exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Gap {
    pub from_ms: i64,
    pub to_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Mark {
    last_ms: i64,
    /// Oldest first; disjoint. A gap is named by its `to_ms`, which never
    /// moves (reading it back moves `from_ms`).
    gaps: Vec<Gap>,
}

/// What a live value is, for the marks.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Live {
    /// The value is the one accepted last already: not emitted again.
    pub duplicate: bool,
    /// The gaps to read back for this tag now (its first value of the
    /// session: the new gap, and any an earlier run left).
    pub read: Vec<Gap>,
    /// Milliseconds of the new gap older than `backfill_max`: not read.
    pub not_read_ms: u64,
}

/// What a value read back is, for the marks.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Inside the gap and newer than what was taken from it: emitted.
    Yes,
    /// Outside the gap, or not newer than the last value taken from it.
    No,
}

/// The marks of one connection's tags.
pub(crate) struct Marks {
    connection: String,
    max_gap_ms: i64,
    tags: HashMap<String, Mark>,
    /// Tags that had a live value on the current session.
    seen: HashSet<String>,
    /// Tags whose mark changed since [`Marks::take_changed`].
    changed: HashSet<String>,
}

impl Marks {
    /// The marks stored for `connection`, for the tags it has now (a tag
    /// removed from the configuration keeps its row, unused).
    pub(crate) fn load(
        connection: &str,
        max_gap: std::time::Duration,
        stored: Vec<TagMark>,
        tags: &HashSet<String>,
    ) -> Marks {
        let tags = stored
            .into_iter()
            .filter(|m| tags.contains(&m.tag))
            .map(|m| {
                let mut gaps: Vec<Gap> = m
                    .gaps
                    .into_iter()
                    .filter(|(from, to)| to > from)
                    .map(|(from_ms, to_ms)| Gap { from_ms, to_ms })
                    .collect();
                gaps.sort_by_key(|g| g.to_ms);
                (
                    m.tag,
                    Mark {
                        last_ms: m.last_ms,
                        gaps,
                    },
                )
            })
            .collect();
        Marks {
            connection: connection.to_string(),
            max_gap_ms: i64::try_from(max_gap.as_millis()).unwrap_or(i64::MAX),
            tags,
            seen: HashSet::new(),
            changed: HashSet::new(),
        }
    }

    /// A new session: every tag's next live value is its first.
    pub(crate) fn session_started(&mut self) {
        self.seen.clear();
    }

    /// A live value of `tag` at `ts_ms` (its source timestamp).
    pub(crate) fn live(&mut self, tag: &str, ts_ms: i64) -> Live {
        let first = !self.seen.contains(tag);
        if first {
            self.seen.insert(tag.to_string());
        }
        let mut out = Live::default();
        let Some(mark) = self.tags.get_mut(tag) else {
            // Never seen before: nothing to read back before it.
            self.tags.insert(
                tag.to_string(),
                Mark {
                    last_ms: ts_ms,
                    gaps: Vec::new(),
                },
            );
            self.changed.insert(tag.to_string());
            return out;
        };
        let mut dirty = false;
        if first {
            if ts_ms == mark.last_ms {
                out.duplicate = true;
            } else if ts_ms > mark.last_ms {
                let earliest = ts_ms.saturating_sub(self.max_gap_ms);
                let from_ms = mark.last_ms.max(earliest);
                out.not_read_ms = u64::try_from(from_ms - mark.last_ms).unwrap_or(0);
                // Values strictly between: none fit in less than 2 ms.
                if ts_ms - from_ms > 1 {
                    mark.gaps.push(Gap {
                        from_ms,
                        to_ms: ts_ms,
                    });
                    dirty = true;
                }
            }
            out.read = mark.gaps.clone();
        }
        if ts_ms > mark.last_ms {
            mark.last_ms = ts_ms;
            dirty = true;
        }
        if dirty && !self.changed.contains(tag) {
            self.changed.insert(tag.to_string());
        }
        out
    }

    /// A value read back for the gap of `tag` ending at `to_ms`.
    pub(crate) fn backfilled(&mut self, tag: &str, to_ms: i64, ts_ms: i64) -> Taken {
        let Some(gap) = self.gap_mut(tag, to_ms) else {
            return Taken::No;
        };
        if ts_ms <= gap.from_ms || ts_ms >= gap.to_ms {
            return Taken::No;
        }
        gap.from_ms = ts_ms;
        self.changed.insert(tag.to_string());
        Taken::Yes
    }

    /// The gap of `tag` ending at `to_ms` is read (or cannot be): forgotten.
    pub(crate) fn gap_done(&mut self, tag: &str, to_ms: i64) {
        if let Some(mark) = self.tags.get_mut(tag) {
            let before = mark.gaps.len();
            mark.gaps.retain(|g| g.to_ms != to_ms);
            if mark.gaps.len() != before {
                self.changed.insert(tag.to_string());
            }
        }
    }

    /// Where the gap of `tag` ending at `to_ms` stands now (None: done).
    #[cfg(test)]
    pub(crate) fn gap(&self, tag: &str, to_ms: i64) -> Option<Gap> {
        self.tags
            .get(tag)?
            .gaps
            .iter()
            .find(|g| g.to_ms == to_ms)
            .copied()
    }

    fn gap_mut(&mut self, tag: &str, to_ms: i64) -> Option<&mut Gap> {
        self.tags
            .get_mut(tag)?
            .gaps
            .iter_mut()
            .find(|g| g.to_ms == to_ms)
    }

    /// Gaps still to read, all tags, and the oldest point among them.
    pub(crate) fn pending(&self) -> (u64, Option<i64>) {
        let gaps = self.tags.values().flat_map(|m| m.gaps.iter());
        gaps.fold((0, None), |(n, oldest), g| {
            (
                n + 1,
                Some(oldest.map_or(g.from_ms, |o: i64| o.min(g.from_ms))),
            )
        })
    }

    /// The marks changed since the last call, as the buffer stores them.
    pub(crate) fn take_changed(&mut self) -> Vec<TagMark> {
        let mut out: Vec<TagMark> = self
            .changed
            .drain()
            .filter_map(|tag| {
                let mark = self.tags.get(&tag)?;
                Some(TagMark {
                    connection: self.connection.clone(),
                    last_ms: mark.last_ms,
                    gaps: mark.gaps.iter().map(|g| (g.from_ms, g.to_ms)).collect(),
                    tag,
                })
            })
            .collect();
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn names(tags: &[&str]) -> HashSet<String> {
        tags.iter().map(|t| t.to_string()).collect()
    }

    fn fresh() -> Marks {
        Marks::load("c", Duration::from_secs(3600), Vec::new(), &names(&["A"]))
    }

    #[test]
    fn the_first_value_of_a_tag_opens_no_gap() {
        let mut m = fresh();
        assert_eq!(m.live("A", 1_000), Live::default());
        assert_eq!(m.live("A", 2_000), Live::default());
        let changed = m.take_changed();
        assert_eq!(changed.len(), 1);
        assert_eq!((changed[0].last_ms, changed[0].gaps.len()), (2_000, 0));
        assert!(m.take_changed().is_empty());
    }

    #[test]
    fn a_new_session_opens_the_gap_to_its_first_value() {
        let mut m = fresh();
        m.live("A", 1_000);
        m.session_started();
        let live = m.live("A", 5_000);
        let gap = Gap {
            from_ms: 1_000,
            to_ms: 5_000,
        };
        assert_eq!(live.read, vec![gap]);
        assert!(!live.duplicate);
        // Later values of the same session open nothing.
        assert_eq!(m.live("A", 6_000), Live::default());
        assert_eq!(m.take_changed()[0].gaps, vec![(1_000, 5_000)]);
    }

    #[test]
    fn the_value_accepted_last_is_not_emitted_again() {
        let mut m = fresh();
        m.live("A", 1_000);
        m.session_started();
        let live = m.live("A", 1_000);
        assert!(live.duplicate);
        assert!(live.read.is_empty());
        // Within a session the same timestamp is a new value.
        assert!(!m.live("A", 1_000).duplicate);
    }

    #[test]
    fn values_read_back_are_taken_once_inside_their_gap() {
        let mut m = fresh();
        m.live("A", 1_000);
        m.session_started();
        m.live("A", 5_000);
        m.take_changed();
        assert_eq!(
            m.backfilled("A", 5_000, 1_000),
            Taken::No,
            "the gap's start"
        );
        assert_eq!(m.backfilled("A", 5_000, 2_000), Taken::Yes);
        assert_eq!(m.backfilled("A", 5_000, 2_000), Taken::No, "twice");
        assert_eq!(m.backfilled("A", 5_000, 1_500), Taken::No, "out of order");
        assert_eq!(m.backfilled("A", 5_000, 5_000), Taken::No, "the live value");
        assert_eq!(m.backfilled("A", 5_000, 9_000), Taken::No, "beyond");
        assert_eq!(m.backfilled("A", 4_000, 3_000), Taken::No, "no such gap");
        assert_eq!(m.backfilled("A", 5_000, 3_000), Taken::Yes);
        // The gap now starts after what was taken: a restart goes on there.
        assert_eq!(m.take_changed()[0].gaps, vec![(3_000, 5_000)]);
        m.gap_done("A", 5_000);
        assert_eq!(m.gap("A", 5_000), None);
        assert_eq!(m.take_changed()[0].gaps, vec![]);
        assert_eq!(m.pending(), (0, None));
    }

    #[test]
    fn a_gap_left_by_a_restart_is_read_with_the_new_one() {
        let stored = vec![TagMark {
            connection: "c".into(),
            tag: "A".into(),
            last_ms: 9_000,
            gaps: vec![(2_000, 5_000)],
        }];
        let mut m = Marks::load("c", Duration::from_secs(3600), stored, &names(&["A"]));
        assert_eq!(m.pending(), (1, Some(2_000)));
        let live = m.live("A", 12_000);
        assert_eq!(
            live.read,
            vec![
                Gap {
                    from_ms: 2_000,
                    to_ms: 5_000
                },
                Gap {
                    from_ms: 9_000,
                    to_ms: 12_000
                }
            ]
        );
        assert_eq!(m.pending(), (2, Some(2_000)));
    }

    #[test]
    fn a_gap_longer_than_the_maximum_is_cut_and_the_rest_reported() {
        let mut m = Marks::load("c", Duration::from_secs(10), Vec::new(), &names(&["A"]));
        m.live("A", 0);
        m.session_started();
        let live = m.live("A", 60_000);
        assert_eq!(live.not_read_ms, 50_000);
        assert_eq!(
            live.read,
            vec![Gap {
                from_ms: 50_000,
                to_ms: 60_000
            }]
        );
    }

    #[test]
    fn marks_of_tags_no_longer_configured_are_left_alone() {
        let stored = vec![TagMark {
            connection: "c".into(),
            tag: "gone".into(),
            last_ms: 1,
            gaps: vec![(0, 9)],
        }];
        let m = Marks::load("c", Duration::from_secs(10), stored, &names(&["A"]));
        assert_eq!(m.pending(), (0, None));
    }

    #[test]
    fn an_earlier_first_value_opens_no_gap_and_keeps_the_newest_mark() {
        let mut m = fresh();
        m.live("A", 5_000);
        m.session_started();
        // A server whose clock went back.
        let live = m.live("A", 3_000);
        assert_eq!(live, Live::default());
        assert_eq!(m.take_changed()[0].last_ms, 5_000);
    }
}
