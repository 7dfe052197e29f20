//! Fresh salts for commands: the random part of every grant token.

use dflockd_core::Salt;

/// Salts for the commands a proposer stamps, from a ChaCha12 CSPRNG
/// (`rand`'s `StdRng`) seeded once from the OS. It makes no system call
/// after seeding: the single-node server draws salts under a table's lock,
/// where a `getrandom` call (a system call, and a point where the kernel may
/// preempt the lock holder) showed in the tail latency.
///
/// ```
/// let mut salts = dflockd_cluster::Salts::default();
/// assert_ne!(salts.next(), salts.next());
/// ```
pub struct Salts(rand::rngs::StdRng);

impl Default for Salts {
    fn default() -> Salts {
        use rand::SeedableRng;
        let rng =
            rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng).unwrap_or_else(|error| {
                // Never expected on a supported OS; seed from the std
                // library's randomly keyed hasher rather than use fixed salts.
                tracing::error!(%error, "OS random source failed; using a fallback seed");
                use std::hash::{BuildHasher, Hasher};
                let mut seed = [0u8; 32];
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                for chunk in seed.chunks_mut(8) {
                    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                    h.write_u64(nanos);
                    chunk.copy_from_slice(&h.finish().to_le_bytes());
                }
                rand::rngs::StdRng::from_seed(seed)
            });
        Salts(rng)
    }
}

impl Salts {
    /// Fresh salts for one command.
    ///
    /// ```
    /// let salt = dflockd_cluster::Salts::default().next();
    /// # let _ = salt;
    /// ```
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Salt {
        use rand::Rng;
        Salt::new(self.0.next_u64(), self.0.next_u64())
    }
}

impl std::fmt::Debug for Salts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The generator's state predicts future salts: never printed.
        f.write_str("Salts(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::Salts;

    #[test]
    fn salts_are_unpredictable_per_process_and_per_token() {
        let mut a = Salts::default();
        let mut b = Salts::default();
        // The salt of each command's first grant.
        let salts_a: Vec<u64> = (0..1000).map(|i| a.next().for_grant(0, i)).collect();
        let salts_b: Vec<u64> = (0..1000).map(|i| b.next().for_grant(0, i)).collect();
        let distinct: std::collections::HashSet<_> = salts_a.iter().chain(&salts_b).collect();
        assert_eq!(distinct.len(), 2000, "a salt repeated");
        // Roughly half the bits set: not a constant or a counter.
        let ones: u32 = salts_a.iter().map(|s| s.count_ones()).sum();
        assert!(
            (30_000..34_000).contains(&ones),
            "{ones} bits set of 64,000"
        );
    }
}
