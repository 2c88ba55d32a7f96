//! The store's segment codec and its cache of decoded segments, shared by
//! every transaction of the store (see `Tx::decode`).

use std::sync::Arc;

use super::segment::{Codec, Segment};

/// Decoded segments kept: one per stream the uplink is working through,
/// and a few more.
const CACHE_SEGMENTS: usize = 8;

/// The store's codec and its cache of decoded segments. Segments are
/// never changed under their id (a re-queue writes a new one), so a cached
/// copy is never stale, whoever else writes the file.
pub(super) struct Segments {
    pub codec: Codec,
    cache: Vec<(i64, Arc<Segment>)>,
}

impl Segments {
    pub fn new(codec: Codec) -> Segments {
        Segments {
            codec,
            cache: Vec::new(),
        }
    }

    pub fn cached(&mut self, id: i64) -> Option<Arc<Segment>> {
        let i = self.cache.iter().position(|(c, _)| *c == id)?;
        let hit = self.cache.remove(i);
        let seg = hit.1.clone();
        self.cache.push(hit);
        Some(seg)
    }

    pub fn keep(&mut self, id: i64, seg: Arc<Segment>) {
        if self.cache.len() >= CACHE_SEGMENTS {
            self.cache.remove(0);
        }
        self.cache.push((id, seg));
    }

    pub fn forget(&mut self, id: i64) {
        self.cache.retain(|(c, _)| *c != id);
    }
}
