//! What the driver and a session's backfill reader pass each other
//! through the feed (docs/backfill.md): gaps to read, and rounds of values
//! read back. Types only, so the feed can carry them without depending on
//! the reader.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::marks::Gap;
use crate::record::NewRecord;
use crate::source::value::TagMeta;

/// A gap of one tag to read back.
pub(crate) struct Work {
    pub tag: Arc<TagMeta>,
    pub gap: Gap,
}

/// Where the driver sends gaps to read on the current session.
pub(crate) type WorkTx = mpsc::UnboundedSender<Work>;

/// One round's values, for the driver; `ack` is answered once they are
/// handed to the buffer (the reader waits for it).
pub(crate) struct Round {
    pub chunks: Vec<Chunk>,
    pub ack: oneshot::Sender<()>,
}

/// What a round read for one gap.
pub(crate) struct Chunk {
    pub tag: Arc<TagMeta>,
    /// The gap's end, which names it.
    pub to_ms: i64,
    /// Tag records marked `"backfill": true`, oldest first.
    pub records: Vec<NewRecord>,
    pub end: End,
    /// Values the server returned that were not asked for.
    pub skipped: u64,
    /// The continuation point was refused: the node is read again.
    pub restarted: bool,
}

/// How a gap stands after a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// More to read.
    More,
    /// Read to its end.
    Done,
    /// The server keeps no history for the tag (the status, or why).
    NoHistory(String),
}
