//! Byte transforms of the write and read paths, with no I/O of their own: compression,
//! age encryption and the sha256 digest.

pub mod compress;
pub mod crypt;
pub mod digest;
