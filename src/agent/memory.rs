//! Keeping the agent's resident memory near what it uses. glibc keeps memory a thread freed in
//! that thread's arena: a `/metrics` scrape reads every link's device (thousands of peers
//! each) on blocking-pool threads, and without a trim the agent stays larger after a scrape
//! than before it. (Limiting glibc to two arenas saved a few MiB more but made scrapes ~25 %
//! slower, the reads contending for them.) Other C libraries (musl) keep no per-thread
//! arenas: nothing to do there.

/// Give the memory freed since (a scrape's device reads) back to the system.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
