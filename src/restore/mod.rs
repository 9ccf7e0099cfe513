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
    check_identities(m, identities)?;
    if let Some(p) = progress {
        p.set_total(m.size);
    }
    let (part, std_file) = create_part(dest)?;
    let guard = PartFile(Some(part.clone()));
    let object = store.data_key(m).ok_or_else(|| RestoreError::Corrupt {
        id: m.id.to_string(),
        detail: format!("its manifest names no snapshot file ({:?})", m.object),
    })?;
    let stored = Arc::new(Mutex::new(Counted::default()));
    let plain = open_plain(store, m, &object, identities, stored.clone()).await?;
    let out = tokio::fs::File::from_std(std_file);
    let raw = copy_bounded(
        m.compression.decoder(plain),
        out,
        m,
        &object,
        dest,
        progress,
    )
    .await?;
    let stored = std::mem::take(&mut *stored.lock().expect("digest lock"));
    check_digests(m, &object, stored, raw)?;
    let report = verify_part(m, &part).await?;
    // Publish without overwriting: a hard link fails if `dest` appeared meanwhile.
    std::fs::hard_link(&part, dest).map_err(|e| RestoreError::File {
        path: dest.to_path_buf(),
        detail: if e.kind() == ErrorKind::AlreadyExists {
            "appeared while restoring; restore never overwrites a file".into()
        } else {
            format!("cannot create: {e}")
        },
    })?;
    drop(guard);
    Ok(FetchReport { verify: report })
}

/// Fails unless the backup is unencrypted or one of `identities` is among its recipients.
fn check_identities(m: &Manifest, identities: Option<&Identities>) -> Result<(), RestoreError> {
    let Some(enc) = &m.encryption else {
        return Ok(());
    };
    let locked = |detail: String| RestoreError::Locked {
        id: m.id.to_string(),
        detail,
    };
    let Some(ids) = identities else {
        return Err(locked(format!(
            "it is encrypted ({}) to {}; pass --identity FILE (or set [encryption] identity_file) with the secret key of one of them",
            enc.method,
            enc.recipients.join(", ")
        )));
    };
    if enc.method != crate::store::manifest::EncryptionMethod::Age {
        return Err(locked(format!(
            "it is encrypted with {:?}, which this version cannot decrypt; use a newer etcd-backup",
            enc.method
        )));
    }
    let mine = ids.recipients();
    if !enc.recipients.iter().any(|r| mine.contains(r)) {
        return Err(locked(format!(
            "none of the identities in {} ({}) is one it was encrypted to ({}); use the identity file of one of those recipients",
            ids.source().display(),
            mine.join(", "),
            enc.recipients.join(", ")
        )));
    }
    Ok(())
}

/// Creates the hidden partial file beside `dest` (mode 0600, never over an existing file).
fn create_part(dest: &Path) -> Result<(PathBuf, std::fs::File), RestoreError> {
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
    let file = opts.open(&part).map_err(|e| {
        file_err(if e.kind() == ErrorKind::AlreadyExists {
            format!(
                "{} exists (another restore running, or left over): remove it",
                part.display()
            )
        } else {
            format!("cannot create {}: {e}", part.display())
        })
    })?;
    Ok((part, file))
}

/// Bytes counted and hashed as they pass.
#[derive(Default)]
struct Counted {
    len: u64,
    hash: Sha256,
}

impl Counted {
    fn add(&mut self, b: &[u8]) {
        self.hash.update(b);
        self.len += b.len() as u64;
    }
}

/// The stored object as a byte stream, decrypted when the backup is encrypted; what comes
/// from the store is counted and hashed into `stored` on the way.
async fn open_plain(
    store: &BackupStore,
    m: &Manifest,
    object: &str,
    identities: Option<&Identities>,
    stored: Arc<Mutex<Counted>>,
) -> Result<Box<dyn tokio::io::AsyncBufRead + Unpin + Send>, RestoreError> {
    let stream = store.get_stream(object).await?.map_ok(move |b| {
        stored.lock().expect("digest lock").add(&b);
        b
    });
    let reader =
        tokio::io::BufReader::with_capacity(256 * 1024, tokio_util::io::StreamReader::new(stream));
    match (&m.encryption, identities) {
        (Some(_), Some(ids)) => {
            use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
            let locked = |e: age::DecryptError| RestoreError::Locked {
                id: m.id.to_string(),
                detail: format!(
                    "cannot decrypt the stored object {object} with the identities in {}: {e}",
                    ids.source().display()
                ),
            };
            let d = age::Decryptor::new_async_buffered(reader.compat())
                .await
                .map_err(locked)?;
            let r = d.decrypt_async(ids.as_dyn()).map_err(locked)?;
            Ok(Box::new(tokio::io::BufReader::with_capacity(
                256 * 1024,
                r.compat(),
            )))
        }
        _ => Ok(Box::new(reader)),
    }
}

/// Copies the decompressed snapshot into `out` and syncs it; never writes more than the
/// manifest declares: a stored object that decompresses to more (a compression bomb, or a
/// damaged object) stops there, not at a full disk.
async fn copy_bounded(
    mut decoder: impl tokio::io::AsyncRead + Unpin,
    out: tokio::fs::File,
    m: &Manifest,
    object: &str,
    dest: &Path,
    progress: Option<&crate::progress::Progress>,
) -> Result<Counted, RestoreError> {
    let write_err = |what: &str, e: std::io::Error| RestoreError::File {
        path: dest.to_path_buf(),
        detail: format!("{what} failed: {e}; check free space"),
    };
    let corrupt = |detail: String| RestoreError::Corrupt {
        id: m.id.to_string(),
        detail,
    };
    let mut out = tokio::io::BufWriter::with_capacity(1024 * 1024, out);
    let mut raw = Counted::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = decoder.read(&mut buf).await.map_err(|e| {
            corrupt(format!(
                "reading or decompressing the stored object {object} failed ({e}): it was modified or damaged in storage, or the download broke off"
            ))
        })?;
        if n == 0 {
            break;
        }
        if raw.len.saturating_add(n as u64) > m.size {
            return Err(corrupt(format!(
                "the stored object {object} decompresses to more than the {} bytes its manifest declares: it was modified or damaged in storage; nothing past that size was written",
                m.size
            )));
        }
        raw.add(&buf[..n]);
        if let Some(p) = progress {
            p.inc(n as u64);
        }
        out.write_all(&buf[..n])
            .await
            .map_err(|e| write_err("writing", e))?;
    }
    out.flush().await.map_err(|e| write_err("writing", e))?;
    out.get_ref()
        .sync_all()
        .await
        .map_err(|e| write_err("fsync", e))?;
    Ok(raw)
}

/// The stored object and the decompressed snapshot must both match the manifest's sizes
/// and sha256.
fn check_digests(
    m: &Manifest,
    object: &str,
    stored: Counted,
    raw: Counted,
) -> Result<(), RestoreError> {
    let corrupt = |detail: String| RestoreError::Corrupt {
        id: m.id.to_string(),
        detail,
    };
    let stored_sha = hex::encode(stored.hash.finalize());
    if stored.len != m.stored_size || stored_sha != m.stored_sha256 {
        return Err(corrupt(format!(
            "the stored object {object} ({} bytes, sha256 {stored_sha}) does not match the manifest ({} bytes, sha256 {}): it was modified or damaged in storage",
            stored.len, m.stored_size, m.stored_sha256
        )));
    }
    let raw_sha = hex::encode(raw.hash.finalize());
    if raw.len != m.size || raw_sha != m.sha256 {
        return Err(corrupt(format!(
            "the decompressed snapshot ({} bytes, sha256 {raw_sha}) does not match the manifest ({} bytes, sha256 {})",
            raw.len, m.size, m.sha256
        )));
    }
    Ok(())
}

/// Runs the verifier over the written file; its revision and hash must be the manifest's.
async fn verify_part(m: &Manifest, part: &Path) -> Result<VerifyReport, RestoreError> {
    let corrupt = |detail: String| RestoreError::Corrupt {
        id: m.id.to_string(),
        detail,
    };
    let p = part.to_path_buf();
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
    Ok(report)
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
