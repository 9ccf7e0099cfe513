//! Getting a backup back: stream the stored object, check its sha256, decompress, check
//! the raw snapshot's size and sha256 against the manifest, write it to a file, and run the
//! verifier on it. Shared by `restore` and `verify`.

pub mod drill;
pub mod etcdutl;
pub mod runbook;

use crate::codec::crypt::Identities;
use crate::codec::digest::Sha256;
use crate::store::manifest::Manifest;
use crate::store::{BackupStore, Listing};
use crate::verify::{self, VerifyOptions, VerifyReport};
use futures::TryStreamExt;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why getting a backup back failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No backup matches.
    #[error("{0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A local file problem.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What happened and what to do.
        detail: String,
    },
    /// The downloaded data does not match the manifest.
    #[error("backup {id}: {detail}")]
    Corrupt {
        /// The backup.
        id: String,
        /// What does not match.
        detail: String,
    },
    /// The backup is encrypted and cannot be decrypted with what was given.
    #[error("backup {id}: {detail}")]
    Locked {
        /// The backup.
        id: String,
        /// Which recipients it was made for and what to pass.
        detail: String,
    },
    /// The verifier rejected the snapshot.
    #[error("backup {id}: the snapshot fails verification: {source}")]
    Verify {
        /// The backup.
        id: String,
        /// The verifier's error.
        source: verify::VerifyError,
    },
}

/// Picks `which` from a listing: an explicit id (any cluster, any date), or `latest`: the
/// newest backup of cluster `cluster_id` not dated in the future.
///
/// # Errors
/// [`RestoreError::NotFound`] naming what exists.
pub fn select<'a>(
    listing: &'a Listing,
    which: &str,
    now: chrono::DateTime<chrono::Utc>,
    cluster_id: Option<&str>,
) -> Result<&'a Manifest, RestoreError> {
    if listing.backups.is_empty() {
        return Err(RestoreError::NotFound(
            "there are no committed backups in the store; check storage.url and backup.cluster_name".into(),
        ));
    }
    if which == "latest" {
        let Some(cluster) = cluster_id else {
            return Err(RestoreError::NotFound(
                "`latest` needs the cluster id whose backups to pick; pass --cluster-id ID or a backup id".into(),
            ));
        };
        return listing.latest(now, cluster).ok_or_else(|| {
            let mut others: Vec<&str> = listing
                .backups
                .iter()
                .map(|m| m.cluster_id.as_str())
                .filter(|c| *c != cluster)
                .collect();
            others.sort_unstable();
            others.dedup();
            RestoreError::NotFound(format!(
                "no backup of etcd cluster {cluster} that is not dated in the future; the store holds backups of cluster ids {}: pass --cluster-id ID to restore another cluster's latest (e.g. after a disaster, when the new cluster has a new id), or a backup id from `etcd-backup list`",
                crate::store::manifest::printable(&others.join(", "))
            ))
        });
    }
    listing
        .backups
        .iter()
        .find(|m| m.id.to_string() == which)
        .ok_or_else(|| {
            RestoreError::NotFound(format!(
                "no committed backup with id {:?}; `etcd-backup list` shows the ids (newest: {})",
                crate::store::manifest::printable(which),
                listing.backups[0].id
            ))
        })
}

/// The result of a successful fetch.
#[derive(Debug)]
pub struct FetchReport {
    /// The verifier's report on the written file.
    pub verify: VerifyReport,
}

/// Streams backup `m` into a new file `dest` (never overwriting anything), checks it against
/// the manifest and verifies it. On any failure the partial file is removed.
///
/// # Errors
/// [`RestoreError`] naming what failed.
pub async fn fetch_to_file(
    store: &BackupStore,
    m: &Manifest,
    dest: &Path,
    progress: Option<&crate::progress::Progress>,
    identities: Option<&Identities>,
) -> Result<FetchReport, RestoreError> {
    if let Some(enc) = &m.encryption {
        let Some(ids) = identities else {
            return Err(RestoreError::Locked {
                id: m.id.to_string(),
                detail: format!(
                    "it is encrypted ({}) to {}; pass --identity FILE (or set [encryption] identity_file) with the secret key of one of them",
                    enc.method,
                    enc.recipients.join(", ")
                ),
            });
        };
        if enc.method != crate::codec::crypt::METHOD_AGE {
            return Err(RestoreError::Locked {
                id: m.id.to_string(),
                detail: format!(
                    "it is encrypted with {:?}, which this version cannot decrypt",
                    enc.method
                ),
            });
        }
        let mine = ids.recipients();
        if !enc.recipients.iter().any(|r| mine.contains(r)) {
            return Err(RestoreError::Locked {
                id: m.id.to_string(),
                detail: format!(
                    "none of the identities in {} ({}) is one it was encrypted to ({}); use the identity file of one of those recipients",
                    ids.source().display(),
                    mine.join(", "),
                    enc.recipients.join(", ")
                ),
            });
        }
    }
    if let Some(p) = progress {
        p.set_total(m.size);
    }
    let file_err = |detail: String| RestoreError::File {
        path: dest.to_path_buf(),
        detail,
    };
    let part = dest.with_file_name(format!(
        ".{}.part",
        dest.file_name()
            .map_or_else(|| "snapshot".into(), |n| n.to_string_lossy())
    ));
    if dest.exists() {
        return Err(file_err(
            "already exists; restore never overwrites a file: choose another --output".into(),
        ));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true).mode(0o600);
    let std_file = opts.open(&part).map_err(|e| {
        file_err(if e.kind() == ErrorKind::AlreadyExists {
            format!(
                "{} exists (another restore running, or left over): remove it",
                part.display()
            )
        } else {
            format!("cannot create {}: {e}", part.display())
        })
    })?;
    let guard = PartFile(Some(part.clone()));

    let object = store.data_key(m).ok_or_else(|| RestoreError::Corrupt {
        id: m.id.to_string(),
        detail: format!("its manifest names no snapshot file ({:?})", m.object),
    })?;
    let stored_hash = Arc::new(Mutex::new(Sha256::new()));
    let stored_len = Arc::new(Mutex::new(0u64));
    let stream = {
        let (h, n) = (stored_hash.clone(), stored_len.clone());
        store.get_stream(&object).await?.map_ok(move |b| {
            h.lock().expect("hash lock").update(&b);
            *n.lock().expect("len lock") += b.len() as u64;
            b
        })
    };
    let reader =
        tokio::io::BufReader::with_capacity(256 * 1024, tokio_util::io::StreamReader::new(stream));
    let plain: Box<dyn tokio::io::AsyncBufRead + Unpin + Send> = match (&m.encryption, identities) {
        (Some(_), Some(ids)) => {
            use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
            let locked = |e: age::DecryptError| RestoreError::Locked {
                id: m.id.to_string(),
                detail: format!(
                    "cannot decrypt the stored object {} with the identities in {}: {e}",
                    object,
                    ids.source().display()
                ),
            };
            let d = age::Decryptor::new_async_buffered(reader.compat())
                .await
                .map_err(locked)?;
            let r = d.decrypt_async(ids.as_dyn()).map_err(locked)?;
            Box::new(tokio::io::BufReader::with_capacity(256 * 1024, r.compat()))
        }
        _ => Box::new(reader),
    };
    let mut decoder = m.compression.decoder(plain);
    let mut out =
        tokio::io::BufWriter::with_capacity(1024 * 1024, tokio::fs::File::from_std(std_file));
    let mut raw_hash = Sha256::new();
    let mut raw_len = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = decoder
            .read(&mut buf)
            .await
            .map_err(|e| RestoreError::Corrupt {
                id: m.id.to_string(),
                detail: format!(
                    "reading or decompressing the stored object {object} failed ({e}): it was modified or damaged in storage, or the download broke off"
                ),
            })?;
        if n == 0 {
            break;
        }
        // Never write more than the manifest declares: a stored object that decompresses
        // to more (a compression bomb, or a damaged object) stops here, not at a full disk.
        if raw_len.saturating_add(n as u64) > m.size {
            return Err(RestoreError::Corrupt {
                id: m.id.to_string(),
                detail: format!(
                    "the stored object {object} decompresses to more than the {} bytes its manifest declares: it was modified or damaged in storage; nothing past that size was written",
                    m.size
                ),
            });
        }
        raw_hash.update(&buf[..n]);
        raw_len += n as u64;
        if let Some(p) = progress {
            p.inc(n as u64);
        }
        out.write_all(&buf[..n])
            .await
            .map_err(|e| file_err(format!("writing failed: {e}; check free space")))?;
    }
    out.flush()
        .await
        .map_err(|e| file_err(format!("writing failed: {e}; check free space")))?;
    out.get_ref()
        .sync_all()
        .await
        .map_err(|e| file_err(format!("fsync failed: {e}")))?;
    drop(out);

    let stored_sha = hex::encode(stored_hash.lock().expect("hash lock").clone().finalize());
    let stored_n = *stored_len.lock().expect("len lock");
    let corrupt = |detail: String| RestoreError::Corrupt {
        id: m.id.to_string(),
        detail,
    };
    if stored_n != m.stored_size || stored_sha != m.stored_sha256 {
        return Err(corrupt(format!(
            "the stored object {} ({stored_n} bytes, sha256 {stored_sha}) does not match the manifest ({} bytes, sha256 {}): it was modified or damaged in storage",
            object, m.stored_size, m.stored_sha256
        )));
    }
    let raw_sha = hex::encode(raw_hash.finalize());
    if raw_len != m.size || raw_sha != m.sha256 {
        return Err(corrupt(format!(
            "the decompressed snapshot ({raw_len} bytes, sha256 {raw_sha}) does not match the manifest ({} bytes, sha256 {})",
            m.size, m.sha256
        )));
    }
    let p = part.clone();
    let report = tokio::task::spawn_blocking(move || {
        verify::verify_file(
            &p,
            &VerifyOptions {
                check_trailer: true,
            },
        )
    })
    .await
    .map_err(|e| corrupt(format!("verifier thread failed: {e}")))?
    .map_err(|source| RestoreError::Verify {
        id: m.id.to_string(),
        source,
    })?;
    if report.revision != m.revision || report.hash != m.verification.hash {
        return Err(corrupt(format!(
            "the snapshot's revision {} and hash {} differ from the manifest's {} and {}",
            report.revision, report.hash, m.revision, m.verification.hash
        )));
    }
    // Publish without overwriting: a hard link fails if `dest` appeared meanwhile.
    std::fs::hard_link(&part, dest).map_err(|e| {
        file_err(if e.kind() == ErrorKind::AlreadyExists {
            "appeared while restoring; restore never overwrites a file".into()
        } else {
            format!("cannot create: {e}")
        })
    })?;
    drop(guard);
    Ok(FetchReport { verify: report })
}

/// Removes the partial file on every way out.
struct PartFile(Option<PathBuf>);

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{memory, put_backup};

    #[tokio::test]
    async fn a_compression_bomb_stops_at_the_declared_size() {
        let (store, _) = memory("", "c");
        // 1 GiB of zeros compresses to a few dozen KiB.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            std::io::Write::write_all(&mut enc, &zeros).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 200_000, "{}", bomb.len());
        let t = chrono::Utc::now();
        let mut m = crate::store::manifest::sample("20260102T030405Z-0a1b2c", t);
        m.stored_size = bomb.len() as u64;
        m.stored_sha256 = hex::encode(sha2_of(&bomb));
        put_backup(&store, &m, Some(&bomb)).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.db");
        let started = std::time::Instant::now();
        let err = fetch_to_file(&store, &m, &dest, None, None)
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(&err, RestoreError::Corrupt { detail, .. } if detail.contains("decompresses to more than the 20512 bytes")),
            "{err}"
        );
        assert!(!dest.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the partial file is removed"
        );
        eprintln!("compression bomb rejected after {took:?}");
    }

    fn sha2_of(b: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b);
        h.finalize()
    }
}
