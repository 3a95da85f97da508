//! Keeping the agent's resident memory near what it uses. glibc gives each thread that
//! allocates under contention an arena of its own and keeps freed memory in it: a `/metrics`
//! scrape reads every link's device (thousands of peers each) on blocking-pool threads, and
//! without this the agent stays several times larger after the first scrape than before it.
//! Other C libraries (musl) keep no per-thread arenas: nothing to do there.

/// Few arenas: the agent's allocations are small and its threads mostly wait. Call before
/// the agent starts threads.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no memory is touched.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}

/// Give the memory freed since (a scrape's device reads) back to the system.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
