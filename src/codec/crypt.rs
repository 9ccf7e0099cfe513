//! Client-side encryption with [age](https://age-encryption.org) to X25519 recipients.
//!
//! Backups are encrypted in the streaming pipeline after compression (compressed data does
//! not compress further once encrypted), so the stored object is `age(zstd(snapshot))` and
//! its key ends in `.age`. Only public keys (recipients) are needed to take backups; the
//! identity (secret key) is needed only to read them back (`verify`, `restore`, drills).
//!
//! Nothing here ever puts a secret key into an error message.

use std::fs;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The encryption method recorded in manifests.
pub const METHOD_AGE: &str = "age";

/// File-name suffix of encrypted data objects.
pub const SUFFIX: &str = ".age";

/// Parses one recipient (`age1…`).
///
/// # Errors
/// A message saying what is expected.
pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient, String> {
    age::x25519::Recipient::from_str(text.trim()).map_err(|e| {
        format!("{text:?} is not an age X25519 recipient ({e}); it starts with \"age1\" (`etcd-backup keygen` or `age-keygen` prints one)")
    })
}

/// Parses all recipients.
///
/// # Errors
/// The first that does not parse.
pub fn parse_recipients(texts: &[String]) -> Result<Vec<age::x25519::Recipient>, String> {
    texts.iter().map(|t| parse_recipient(t)).collect()
}

/// The recipients backups are encrypted to, parsed once when the configuration is loaded:
/// their public keys as written (for manifests and messages) and as keys (for the
/// encryptor). Never holds a secret.
#[derive(Clone, Default)]
pub struct Recipients {
    texts: Vec<String>,
    keys: Vec<age::x25519::Recipient>,
}

impl Recipients {
    /// Parses `texts`, sorted and without duplicates.
    ///
    /// # Errors
    /// The first that does not parse.
    pub fn parse(mut texts: Vec<String>) -> Result<Recipients, String> {
        texts.sort();
        texts.dedup();
        let keys = parse_recipients(&texts)?;
        Ok(Recipients { texts, keys })
    }

    /// The public keys as written (`age1…`).
    pub fn texts(&self) -> &[String] {
        &self.texts
    }

    /// The parsed keys.
    pub fn keys(&self) -> &[age::x25519::Recipient] {
        &self.keys
    }

    /// Whether there are none (encryption off).
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.texts).finish()
    }
}

impl serde::Serialize for Recipients {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.texts.serialize(s)
    }
}

/// Reads a recipients file: one `age1…` per line; blank lines and `#` comments are skipped.
///
/// # Errors
/// When the file cannot be read.
pub fn read_recipients_file(path: &Path) -> Result<Vec<String>, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// Secret keys read from an identity file.
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
    source: PathBuf,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Identities({} from {})",
            self.keys.len(),
            self.source.display()
        )
    }
}

impl Identities {
    /// Reads `path` (`AGE-SECRET-KEY-1…` lines, `#` comments, as `age-keygen` writes). A file
    /// that other users may read is refused.
    ///
    /// # Errors
    /// A message naming the file and what to do; never its content.
    pub fn load(path: &Path) -> Result<Identities, String> {
        let shown = path.display();
        let meta = fs::metadata(path).map_err(|e| {
            format!("cannot read the identity file {shown}: {e}; pass the file `etcd-backup keygen` wrote")
        })?;
        if meta.mode() & 0o004 != 0 {
            return Err(format!(
                "the identity file {shown} is readable by every user (mode {:o}); it holds a secret key: chmod 600 {shown}",
                meta.mode() & 0o777
            ));
        }
        let file = fs::File::open(path)
            .map_err(|e| format!("cannot read the identity file {shown}: {e}"))?;
        let mut keys = Vec::new();
        for (n, line) in io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| format!("cannot read the identity file {shown}: {e}"))?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = age::x25519::Identity::from_str(line).map_err(|_| {
                format!(
                    "line {} of {shown} is not an age identity (AGE-SECRET-KEY-1…); only X25519 identities are supported",
                    n + 1
                )
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(format!("the identity file {shown} holds no identity"));
        }
        Ok(Identities {
            keys,
            source: path.to_path_buf(),
        })
    }

    /// The identities' public keys.
    pub fn recipients(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.to_public().to_string())
            .collect()
    }

    /// The file the identities came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// For the decryptor.
    pub fn as_dyn(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.keys.iter().map(|k| k as &dyn age::Identity)
    }
}

/// The identities to decrypt with: `flag` (`--identity`) or else `configured` (`[encryption]
/// identity_file`); `None` when neither is set.
///
/// # Errors
/// When the file cannot be used (see [`Identities::load`]).
pub fn identities_for(
    configured: Option<&Path>,
    flag: Option<&Path>,
) -> Result<Option<Identities>, String> {
    match flag.or(configured) {
        None => Ok(None),
        Some(p) => Identities::load(p).map(Some),
    }
}

/// Writes a new identity to `path` (created, never overwritten, mode 0600) and returns its
/// recipient.
///
/// # Errors
/// When the file exists or cannot be written.
pub fn keygen(path: &Path) -> Result<String, String> {
    use age::secrecy::ExposeSecret;
    let key = age::x25519::Identity::generate();
    let recipient = key.to_public().to_string();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                format!(
                    "{} exists; keygen never overwrites a key: choose another path",
                    path.display()
                )
            } else {
                format!("cannot create {}: {e}", path.display())
            }
        })?;
    let text = format!(
        "# created: {}\n# public key: {recipient}\n{}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        key.to_string().expose_secret()
    );
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(recipient)
}

/// The encrypting end of the pipeline: passes bytes through, or encrypts them to the
/// recipients.
pub enum Sealer<W: Write> {
    /// No encryption.
    Plain(W),
    /// age.
    Age(age::stream::StreamWriter<W>),
}

impl<W: Write> Sealer<W> {
    /// Wraps `out`; with recipients, writes the age header at once.
    ///
    /// # Errors
    /// When the header cannot be written.
    pub fn new(out: W, recipients: &[age::x25519::Recipient]) -> io::Result<Self> {
        if recipients.is_empty() {
            return Ok(Sealer::Plain(out));
        }
        let enc =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| io::Error::other(format!("cannot set up encryption: {e}")))?;
        Ok(Sealer::Age(enc.wrap_output(out)?))
    }

    /// Ends the stream (the age final chunk) and returns the writer.
    ///
    /// # Errors
    /// Errors of the writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Sealer::Plain(w) => Ok(w),
            Sealer::Age(w) => w.finish(),
        }
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sealer::Plain(w) => w.write(data),
            Sealer::Age(w) => w.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealer::Plain(w) => w.flush(),
            Sealer::Age(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    fn seal(data: &[u8], recipients: &[age::x25519::Recipient]) -> Vec<u8> {
        let mut s = Sealer::new(Vec::new(), recipients).unwrap();
        for c in data.chunks(777) {
            s.write_all(c).unwrap();
        }
        s.finish().unwrap()
    }

    fn open(data: &[u8], ids: &Identities) -> Result<Vec<u8>, age::DecryptError> {
        let d = age::Decryptor::new(data)?;
        let mut r = d.decrypt(ids.as_dyn())?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        Ok(out)
    }

    #[test]
    fn round_trip_with_either_of_two_recipients_and_not_with_a_third() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        let ra = keygen(&a).unwrap();
        let rb = keygen(&b).unwrap();
        keygen(&c).unwrap();
        let recipients = parse_recipients(&[ra.clone(), rb]).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sealed = seal(&data, &recipients);
        assert_ne!(sealed, data);
        assert!(sealed.starts_with(b"age-encryption.org/v1"));
        for id in [&a, &b] {
            let ids = Identities::load(id).unwrap();
            assert_eq!(open(&sealed, &ids).unwrap(), data);
        }
        let wrong = Identities::load(&c).unwrap();
        assert!(matches!(
            open(&sealed, &wrong),
            Err(age::DecryptError::NoMatchingKeys)
        ));
        assert_eq!(Identities::load(&a).unwrap().recipients(), vec![ra]);
        // Plain mode passes bytes through.
        assert_eq!(seal(&data, &[]), data);
    }

    #[test]
    fn keygen_writes_a_private_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id.txt");
        let r = keygen(&p).unwrap();
        assert!(r.starts_with("age1"));
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = keygen(&p).unwrap_err();
        assert!(err.contains("never overwrites"), "{err}");
    }

    #[test]
    fn identity_files_that_others_can_read_or_that_hold_no_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id.txt");
        keygen(&p).unwrap();
        let secret = fs::read_to_string(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identities::load(&p).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("AGE-SECRET-KEY"), "{err}");

        let bad = dir.path().join("bad.txt");
        fs::write(&bad, "# comment\nAGE-SECRET-KEY-1NOTAKEY\n").unwrap();
        fs::set_permissions(&bad, fs::Permissions::from_mode(0o600)).unwrap();
        let err = Identities::load(&bad).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("NOTAKEY"), "{err}");
        assert!(!err.contains(secret.trim()), "{err}");

        let empty = dir.path().join("empty.txt");
        fs::write(&empty, "# nothing\n").unwrap();
        fs::set_permissions(&empty, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Identities::load(&empty)
            .unwrap_err()
            .contains("no identity"));
    }

    #[test]
    fn recipients_are_checked() {
        assert!(parse_recipient("age1notarecipient").is_err());
        let dir = tempfile::tempdir().unwrap();
        let r = keygen(&dir.path().join("k")).unwrap();
        let f = dir.path().join("recipients.txt");
        fs::write(&f, format!("# ops team\n\n{r}\n")).unwrap();
        assert_eq!(read_recipients_file(&f).unwrap(), vec![r]);
    }
}
