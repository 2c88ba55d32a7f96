//! The process heap on glibc: few arenas, and freed memory handed back after
//! the bursts (docs/performance.md, "Memory").
//!
//! glibc gives every thread that contends for the heap an arena of its own,
//! up to eight per core, and keeps what was freed in each for reuse. The
//! agent's threads (tokio workers, the buffer writer, the OPC UA and MQTT
//! event loops) take turns on the same data, so the extra arenas only hold
//! memory: measured with 10 000 monitored items, two arenas instead of the
//! default cut the idle agent's RSS by about a third at no measurable cost
//! at 100 000 values/s. And a burst (parsing a large config, subscribing
//! 10 000 items, draining a backlog) leaves freed pages that glibc keeps
//! until told otherwise: [`release_free`] tells it at the ends of bursts,
//! and [`release_periodically`] every half minute.
//! Other C libraries (musl) have neither knob: both are no-ops there.

/// Limits the heap to two arenas. Call first thing in `main`, before any
/// thread exists.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the
    // runtime starts any thread, as glibc asks for M_ARENA_MAX.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// How often freed pages go back while the agent runs, for the bursts no one
/// marks (the first values of thousands of new items, a flood of events).
const RELEASE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Calls [`release_free`] every [`RELEASE_EVERY`] until `cancel`.
pub async fn release_periodically(cancel: tokio_util::sync::CancellationToken) {
    let first = tokio::time::Instant::now() + RELEASE_EVERY;
    let mut tick = tokio::time::interval_at(first, RELEASE_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => release_free(),
        }
    }
}

/// Returns freed heap pages to the system (after a burst of allocations).
/// Takes a few milliseconds with a large heap: not for hot paths.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
