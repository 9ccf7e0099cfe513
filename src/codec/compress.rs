//! Compression of stored snapshots: zstd (default, multithreaded, frame checksum on),
//! gzip, or none.
//!
//! Encoding is synchronous and runs on the pipeline's own thread (see `pipeline`), so
//! CPU-heavy work never blocks the async runtime. Decoding is async, for streaming a
//! stored object back out of the store.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;
use tokio::io::{AsyncBufRead, AsyncRead};

/// A stored object's compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Zstandard: fast, strong, multithreaded; the default.
    Zstd,
    /// gzip, for consumers that only have gzip.
    Gzip,
    /// Stored as is.
    None,
}

impl Compression {
    /// File-name suffix of a stored object, including the leading dot ("" for none).
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::Zstd => ".zst",
            Compression::Gzip => ".gz",
            Compression::None => "",
        }
    }

    /// The level used when none is configured. zstd 1: on Kubernetes-like snapshots it has
    /// the least time x size (scripts/bench.sh, 1 GiB, single-threaded: 2.7 s / 150.7 MB
    /// against 3.3 s / 147.0 MB for level 3; see the README's performance section), and a
    /// cycle on a small control-plane node is bound by CPU.
    pub fn default_level(self) -> i32 {
        match self {
            Compression::Zstd => 1,
            Compression::Gzip => 6,
            Compression::None => 0,
        }
    }

    /// Checks a configured level.
    ///
    /// # Errors
    /// A message naming the allowed range.
    pub fn check_level(self, level: i32) -> Result<(), String> {
        let (lo, hi) = match self {
            Compression::Zstd => (1, 19),
            Compression::Gzip => (1, 9),
            Compression::None => {
                return Err("is set but backup.compression is \"none\"".to_string());
            }
        };
        if (lo..=hi).contains(&level) {
            Ok(())
        } else {
            Err(format!("{level} is out of range for {self} ({lo}..={hi})"))
        }
    }

    /// Wraps `sink` in an encoder. `level` of `None` uses [`Compression::default_level`].
    ///
    /// # Errors
    /// When the zstd context cannot be created (out of memory).
    pub fn encoder<W: Write + Send + 'static>(
        self,
        sink: W,
        level: Option<i32>,
    ) -> io::Result<Encoder<W>> {
        let level = level.unwrap_or(self.default_level());
        Ok(match self {
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(sink, level)?;
                e.include_checksum(true)?;
                let workers = zstd_workers();
                // One worker would only add a thread and its job buffers (tens of MiB): with
                // one, compress on the pipeline thread, which keeps up with the stream.
                if workers > 1 {
                    e.multithread(workers)?;
                    // Small jobs bound the buffers zstd keeps per worker.
                    e.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))?;
                }
                Encoder::Zstd(e)
            }
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                sink,
                flate2::Compression::new(level.clamp(1, 9) as u32),
            )),
            Compression::None => Encoder::None(sink),
        })
    }

    /// Wraps a buffered async reader of the stored bytes in the matching decoder.
    pub fn decoder<'a, R: AsyncBufRead + Unpin + Send + 'a>(
        self,
        r: R,
    ) -> Box<dyn AsyncRead + Unpin + Send + 'a> {
        match self {
            Compression::Zstd => Box::new(async_compression::tokio::bufread::ZstdDecoder::new(r)),
            Compression::Gzip => Box::new(async_compression::tokio::bufread::GzipDecoder::new(r)),
            Compression::None => Box::new(r),
        }
    }
}

/// Bytes of input per zstd job when compressing on several threads.
const ZSTD_JOB_SIZE: u32 = 2 << 20;

/// zstd worker threads: compression overlaps with the snapshot stream, but leaves a core
/// for etcd itself, which runs on the same node.
fn zstd_workers() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u32;
    (cpus / 2).clamp(1, 4)
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        })
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            other => Err(format!(
                "{other:?} is not a supported compression; use \"zstd\", \"gzip\" or \"none\""
            )),
        }
    }
}

/// A synchronous compressing writer.
pub enum Encoder<W: Write> {
    /// zstd
    Zstd(zstd::stream::write::Encoder<'static, W>),
    /// gzip
    Gzip(flate2::write::GzEncoder<W>),
    /// pass-through
    None(W),
}

impl<W: Write> Encoder<W> {
    /// Writes the end of the stream and returns the sink.
    ///
    /// # Errors
    /// Errors of the sink.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Gzip(e) => e.finish(),
            Encoder::None(mut w) => {
                w.flush()?;
                Ok(w)
            }
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn roundtrip(c: Compression, data: &[u8]) -> (usize, Vec<u8>) {
        let mut enc = c.encoder(Vec::new(), None).unwrap();
        for chunk in data.chunks(7919) {
            enc.write_all(chunk).unwrap();
        }
        let stored = enc.finish().unwrap();
        let mut out = Vec::new();
        c.decoder(&stored[..]).read_to_end(&mut out).await.unwrap();
        (stored.len(), out)
    }

    #[tokio::test]
    async fn every_codec_round_trips() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("key-{i} value-{}\n", i % 97).into_bytes())
            .collect();
        for c in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let (stored, out) = roundtrip(c, &data).await;
            assert_eq!(out, data, "{c}");
            if c == Compression::None {
                assert_eq!(stored, data.len());
            } else {
                assert!(
                    stored * 3 < data.len(),
                    "{c} compressed {} to {stored}",
                    data.len()
                );
            }
        }
    }

    #[tokio::test]
    async fn zstd_frames_carry_a_checksum() {
        let data = vec![42u8; 100_000];
        let mut enc = Compression::Zstd.encoder(Vec::new(), None).unwrap();
        enc.write_all(&data).unwrap();
        let mut stored = enc.finish().unwrap();
        // Flip a bit in the last 4 bytes (the content checksum): decoding must fail.
        let n = stored.len();
        stored[n - 2] ^= 0x10;
        let mut out = Vec::new();
        let r = Compression::Zstd
            .decoder(&stored[..])
            .read_to_end(&mut out)
            .await;
        assert!(r.is_err(), "a corrupted checksum must be detected");
    }

    #[test]
    fn names_and_levels() {
        assert_eq!("gzip".parse::<Compression>().unwrap(), Compression::Gzip);
        assert!("lz4".parse::<Compression>().is_err());
        assert!(Compression::Zstd.check_level(19).is_ok());
        assert!(Compression::Zstd.check_level(20).is_err());
        assert!(Compression::Gzip.check_level(0).is_err());
        assert!(Compression::None.check_level(1).is_err());
        assert_eq!(Compression::Gzip.suffix(), ".gz");
    }
}
