//! SHA-256 for the hot paths (the snapshot stream, the trailer check, downloads), using
//! ring's implementation, which uses the CPU's SHA extensions where present (about 1.3 GB/s
//! here against 0.8 GB/s for the portable one).

/// An incremental SHA-256.
#[derive(Clone)]
pub struct Sha256(ring::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    /// A new hash.
    pub fn new() -> Self {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest.
    pub fn finalize(self) -> [u8; 32] {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn matches_the_portable_implementation() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = Sha256::new();
        for c in data.chunks(977) {
            h.update(c);
        }
        let copy = h.clone();
        let a = h.finalize();
        assert_eq!(a, <[u8; 32]>::from(sha2::Sha256::digest(&data)));
        assert_eq!(copy.finalize(), a);
    }
}
