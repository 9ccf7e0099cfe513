//! The segment format: every event of the revisions `(after, last]`, grouped by revision so
//! that one original transaction stays one unit.
//!
//! ```text
//! header   "ETCDSEG\0" (8 bytes) · format version u16 · after_revision i64
//! record*  length u32 (> 0) · revision i64 · observed_at (unix ms) i64 · event count u32 · event*
//! event    tag u8 (1 put, 2 delete) · key (u32 length + bytes) · mod_revision i64
//!          put only: value (u32 length + bytes) · create_revision i64 · version i64 · lease i64
//! end      length u32 = 0 · revision count u64 · event count u64
//! ```
//!
//! All integers are big-endian. A segment is valid only when its revisions are exactly
//! `after + 1, after + 2, …, last` (etcd gives every revision at least one event and
//! numbers them without holes, so a missing revision is a lost event), every event's
//! `mod_revision` is its record's revision, observation times never go backwards, and the
//! end record's counts match. A truncated segment is always an error, never a shorter
//! history. Reading and writing stream record by record: memory holds one revision.

use crate::codec::digest::Sha256;
use std::io::{self, Read, Write};

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"ETCDSEG\0";
/// The format version this build writes (and the newest it reads).
pub const FORMAT_VERSION: u16 = 1;
/// Largest record accepted when reading: bigger than any etcd request (etcd's
/// `--max-request-bytes` is 1.5 MiB by default), small enough to refuse corrupt lengths
/// before allocating.
pub const MAX_RECORD_BYTES: u32 = 512 * 1024 * 1024;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

/// One change to one key, as the watch delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A key was written.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
        /// Revision at which the key was created (last created, after a delete).
        create_revision: i64,
        /// Revision of this write (equals its record's revision).
        mod_revision: i64,
        /// Number of writes since the key was created (1 on creation).
        version: i64,
        /// Lease the key was attached to (0 for none).
        lease: i64,
    },
    /// A key was deleted (by a delete, a delete-range or a lease's expiry or revocation).
    Delete {
        /// The key.
        key: Vec<u8>,
        /// Revision of the delete (equals its record's revision).
        mod_revision: i64,
    },
}

impl Event {
    /// The key the event changes.
    pub fn key(&self) -> &[u8] {
        match self {
            Event::Put { key, .. } | Event::Delete { key, .. } => key,
        }
    }

    /// The revision the event happened at.
    pub fn mod_revision(&self) -> i64 {
        match self {
            Event::Put { mod_revision, .. } | Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Event::Put { key, value, .. } => 1 + 4 + key.len() + 8 + 4 + value.len() + 24,
            Event::Delete { key, .. } => 1 + 4 + key.len() + 8,
        }
    }
}

/// All events of one revision: one original transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionGroup {
    /// The revision.
    pub revision: i64,
    /// When the writer received the revision (unix milliseconds): an upper bound of its
    /// commit time, a few milliseconds late.
    pub observed_at_ms: i64,
    /// The events, in the order etcd applied them.
    pub events: Vec<Event>,
}

impl RevisionGroup {
    /// Bytes this group takes in a segment.
    pub fn encoded_len(&self) -> usize {
        4 + 8 + 8 + 4 + self.events.iter().map(Event::encoded_len).sum::<usize>()
    }
}

/// Why bytes are not a valid segment, or a group cannot be added to one.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// Reading or writing failed.
    #[error("segment I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The bytes do not start like a segment.
    #[error("not a segment (bad magic): the object is not an etcd-backup segment or is damaged")]
    BadMagic,
    /// Written by a newer etcd-backup.
    #[error(
        "segment format version {0} is newer than this etcd-backup understands ({FORMAT_VERSION}): \
         restore with the version that wrote it or newer"
    )]
    NewerFormat(u16),
    /// The segment ends before its end record.
    #[error("segment is truncated ({0}): the object is incomplete or damaged")]
    Truncated(&'static str),
    /// The content breaks one of the format's rules.
    #[error("segment is invalid: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> SegmentError {
    SegmentError::Invalid(msg.into())
}

/// What a finished segment holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    /// The revision the segment continues from (exclusive).
    pub after_revision: i64,
    /// Its last revision (inclusive); equals `after_revision` when empty.
    pub last_revision: i64,
    /// Observation time of its first revision (unix ms), 0 when empty.
    pub first_observed_ms: i64,
    /// Observation time of its last revision (unix ms), 0 when empty.
    pub last_observed_ms: i64,
    /// Number of revisions.
    pub revisions: u64,
    /// Number of events.
    pub events: u64,
    /// Encoded size in bytes (before compression and encryption).
    pub size: u64,
    /// sha256 of the encoded bytes.
    pub sha256: [u8; 32],
}

/// A `Write` that hashes and counts what passes through.
struct Counting<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one segment, group by group, to any `Write` (typically the compressor feeding
/// a spool file).
pub struct SegmentWriter<W: Write> {
    out: Counting<W>,
    after: i64,
    last: i64,
    first_ms: i64,
    last_ms: i64,
    revisions: u64,
    events: u64,
}

impl<W: Write> SegmentWriter<W> {
    /// Starts a segment that continues from revision `after`.
    pub fn new(out: W, after: i64) -> Result<Self, SegmentError> {
        let mut out = Counting {
            inner: out,
            hash: Sha256::new(),
            bytes: 0,
        };
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_be_bytes())?;
        out.write_all(&after.to_be_bytes())?;
        Ok(SegmentWriter {
            out,
            after,
            last: after,
            first_ms: 0,
            last_ms: 0,
            revisions: 0,
            events: 0,
        })
    }

    /// The last revision written so far (`after` when none).
    pub fn last_revision(&self) -> i64 {
        self.last
    }

    /// Number of revisions written so far.
    pub fn revisions(&self) -> u64 {
        self.revisions
    }

    /// Encoded bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.out.bytes
    }

    /// Appends one revision. It must be the next one (`last + 1`), non-empty, with every
    /// event at that revision; a time earlier than the previous group's is raised to it,
    /// so times in a segment never go backwards even when the clock does.
    pub fn push(&mut self, group: &RevisionGroup) -> Result<(), SegmentError> {
        if group.revision != self.last + 1 {
            return Err(invalid(format!(
                "revision {} does not follow {} (events of revisions {}..{} are missing)",
                group.revision,
                self.last,
                self.last + 1,
                group.revision - 1
            )));
        }
        if group.events.is_empty() {
            return Err(invalid(format!(
                "revision {} has no events",
                group.revision
            )));
        }
        if let Some(e) = group
            .events
            .iter()
            .find(|e| e.mod_revision() != group.revision)
        {
            return Err(invalid(format!(
                "an event at revision {} sits in revision {}'s group",
                e.mod_revision(),
                group.revision
            )));
        }
        let len = group.encoded_len() - 4;
        let len = u32::try_from(len)
            .ok()
            .filter(|l| *l <= MAX_RECORD_BYTES)
            .ok_or_else(|| invalid(format!("revision {} is too large to store", group.revision)))?;
        let ms = if self.revisions == 0 {
            group.observed_at_ms
        } else {
            group.observed_at_ms.max(self.last_ms)
        };
        let count = u32::try_from(group.events.len())
            .map_err(|_| invalid(format!("revision {} has too many events", group.revision)))?;
        let mut buf = Vec::with_capacity(len as usize + 4);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&group.revision.to_be_bytes());
        buf.extend_from_slice(&ms.to_be_bytes());
        buf.extend_from_slice(&count.to_be_bytes());
        for e in &group.events {
            match e {
                Event::Put {
                    key,
                    value,
                    create_revision,
                    mod_revision,
                    version,
                    lease,
                } => {
                    buf.push(TAG_PUT);
                    put_bytes(&mut buf, key);
                    buf.extend_from_slice(&mod_revision.to_be_bytes());
                    put_bytes(&mut buf, value);
                    buf.extend_from_slice(&create_revision.to_be_bytes());
                    buf.extend_from_slice(&version.to_be_bytes());
                    buf.extend_from_slice(&lease.to_be_bytes());
                }
                Event::Delete { key, mod_revision } => {
                    buf.push(TAG_DELETE);
                    put_bytes(&mut buf, key);
                    buf.extend_from_slice(&mod_revision.to_be_bytes());
                }
            }
        }
        debug_assert_eq!(buf.len(), len as usize + 4);
        self.out.write_all(&buf)?;
        if self.revisions == 0 {
            self.first_ms = ms;
        }
        self.last_ms = ms;
        self.last = group.revision;
        self.revisions += 1;
        self.events += u64::from(count);
        Ok(())
    }

    /// Writes the end record; returns the inner writer and what the segment holds.
    pub fn finish(mut self) -> Result<(W, SegmentSummary), SegmentError> {
        self.out.write_all(&0u32.to_be_bytes())?;
        self.out.write_all(&self.revisions.to_be_bytes())?;
        self.out.write_all(&self.events.to_be_bytes())?;
        self.out.flush()?;
        let summary = SegmentSummary {
            after_revision: self.after,
            last_revision: self.last,
            first_observed_ms: self.first_ms,
            last_observed_ms: self.last_ms,
            revisions: self.revisions,
            events: self.events,
            size: self.out.bytes,
            sha256: self.out.hash.finalize(),
        };
        Ok((self.out.inner, summary))
    }
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    // Lengths were bounded by the record length check before this is called.
    buf.extend_from_slice(&(b.len() as u32).to_be_bytes());
    buf.extend_from_slice(b);
}

/// Encodes `groups` as one segment into memory (for tests and small tools).
pub fn encode(after: i64, groups: &[RevisionGroup]) -> Result<Vec<u8>, SegmentError> {
    let mut w = SegmentWriter::new(Vec::new(), after)?;
    for g in groups {
        w.push(g)?;
    }
    Ok(w.finish()?.0)
}

/// Reads a segment group by group, checking every rule of the format as it goes.
pub struct SegmentReader<R: Read> {
    input: R,
    hash: Sha256,
    bytes: u64,
    after: i64,
    last: i64,
    first_ms: i64,
    last_ms: i64,
    revisions: u64,
    events: u64,
    done: Option<SegmentSummary>,
}

impl<R: Read> SegmentReader<R> {
    /// Reads the header.
    pub fn new(mut input: R) -> Result<Self, SegmentError> {
        let mut header = [0u8; 18];
        read_exact(&mut input, &mut header, "header")?;
        if &header[..8] != MAGIC {
            return Err(SegmentError::BadMagic);
        }
        let version = u16::from_be_bytes([header[8], header[9]]);
        if version > FORMAT_VERSION || version == 0 {
            return Err(SegmentError::NewerFormat(version));
        }
        let after = i64::from_be_bytes(header[10..18].try_into().expect("8 bytes"));
        let mut hash = Sha256::new();
        hash.update(&header);
        Ok(SegmentReader {
            input,
            hash,
            bytes: header.len() as u64,
            after,
            last: after,
            first_ms: 0,
            last_ms: 0,
            revisions: 0,
            events: 0,
            done: None,
        })
    }

    /// The revision the segment continues from.
    pub fn after_revision(&self) -> i64 {
        self.after
    }

    fn take(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), SegmentError> {
        read_exact(&mut self.input, buf, what)?;
        self.hash.update(buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// The next revision, or `None` after the end record (whose counts are checked, and
    /// after which nothing may follow).
    pub fn next_group(&mut self) -> Result<Option<RevisionGroup>, SegmentError> {
        if self.done.is_some() {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.take(&mut len, "record length")?;
        let len = u32::from_be_bytes(len);
        if len == 0 {
            let mut end = [0u8; 16];
            self.take(&mut end, "end record")?;
            let revisions = u64::from_be_bytes(end[..8].try_into().expect("8 bytes"));
            let events = u64::from_be_bytes(end[8..].try_into().expect("8 bytes"));
            if revisions != self.revisions || events != self.events {
                return Err(invalid(format!(
                    "end record counts {revisions} revisions and {events} events, \
                     the segment holds {} and {}",
                    self.revisions, self.events
                )));
            }
            let mut extra = [0u8; 1];
            if self.input.read(&mut extra)? != 0 {
                return Err(invalid("bytes follow the end record"));
            }
            self.done = Some(SegmentSummary {
                after_revision: self.after,
                last_revision: self.last,
                first_observed_ms: self.first_ms,
                last_observed_ms: self.last_ms,
                revisions: self.revisions,
                events: self.events,
                size: self.bytes,
                sha256: std::mem::take(&mut self.hash).finalize(),
            });
            return Ok(None);
        }
        if len > MAX_RECORD_BYTES {
            return Err(invalid(format!(
                "record of {len} bytes is larger than any revision"
            )));
        }
        let mut body = vec![0u8; len as usize];
        self.take(&mut body, "record")?;
        let group = parse_record(&body)?;
        if group.revision != self.last + 1 {
            return Err(invalid(format!(
                "revision {} follows {}: revisions {}..{} are missing",
                group.revision,
                self.last,
                self.last + 1,
                group.revision - 1
            )));
        }
        if self.revisions > 0 && group.observed_at_ms < self.last_ms {
            return Err(invalid(format!(
                "revision {}'s time goes backwards",
                group.revision
            )));
        }
        if self.revisions == 0 {
            self.first_ms = group.observed_at_ms;
        }
        self.last_ms = group.observed_at_ms;
        self.last = group.revision;
        self.revisions += 1;
        self.events += group.events.len() as u64;
        Ok(Some(group))
    }

    /// What the segment held, once `next_group` has returned `None`.
    pub fn summary(&self) -> Option<&SegmentSummary> {
        self.done.as_ref()
    }
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), SegmentError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SegmentError::Truncated(what)
        } else {
            SegmentError::Io(e)
        }
    })
}

/// A cursor over one record's bytes.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], SegmentError> {
        if self.0.len() < n {
            return Err(invalid("a record's contents overrun its length"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn i64(&mut self) -> Result<i64, SegmentError> {
        Ok(i64::from_be_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, SegmentError> {
        Ok(u32::from_be_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn vec(&mut self) -> Result<Vec<u8>, SegmentError> {
        let n = self.u32()? as usize;
        Ok(self.bytes(n)?.to_vec())
    }
}

fn parse_record(body: &[u8]) -> Result<RevisionGroup, SegmentError> {
    let mut c = Cursor(body);
    let revision = c.i64()?;
    let observed_at_ms = c.i64()?;
    let count = c.u32()?;
    if count == 0 {
        return Err(invalid(format!("revision {revision} has no events")));
    }
    // Each event takes at least 13 bytes: refuse counts the record cannot hold before
    // reserving room for them.
    if count as usize > body.len() / 13 {
        return Err(invalid(format!(
            "revision {revision} claims more events than it holds"
        )));
    }
    let mut events = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let tag = c.bytes(1)?[0];
        let key = c.vec()?;
        let mod_revision = c.i64()?;
        if mod_revision != revision {
            return Err(invalid(format!(
                "an event at revision {mod_revision} sits in revision {revision}'s record"
            )));
        }
        events.push(match tag {
            TAG_PUT => Event::Put {
                key,
                mod_revision,
                value: c.vec()?,
                create_revision: c.i64()?,
                version: c.i64()?,
                lease: c.i64()?,
            },
            TAG_DELETE => Event::Delete { key, mod_revision },
            t => {
                return Err(invalid(format!(
                    "unknown event type {t} at revision {revision}"
                )))
            }
        });
    }
    if !c.0.is_empty() {
        return Err(invalid(format!(
            "revision {revision}'s record has {} bytes after its events",
            c.0.len()
        )));
    }
    Ok(RevisionGroup {
        revision,
        observed_at_ms,
        events,
    })
}

/// Decodes a whole segment held in memory.
pub fn decode(bytes: &[u8]) -> Result<(Vec<RevisionGroup>, SegmentSummary), SegmentError> {
    let mut r = SegmentReader::new(bytes)?;
    let mut groups = Vec::new();
    while let Some(g) = r.next_group()? {
        groups.push(g);
    }
    let summary = r.summary().cloned().expect("set at the end record");
    Ok((groups, summary))
}

#[cfg(test)]
mod tests;
