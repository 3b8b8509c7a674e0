//! HPACK (RFC 7541): [`Decoder`] for header blocks received, [`Encoder`] for those sent.
//! Each connection has one of each, used on the thread that runs it.

mod decode;
mod encode;

pub use decode::{Decoder, Error};
pub use encode::{put_int, put_str, Encoder};
