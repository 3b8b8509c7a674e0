//! gRPC unary calls over the `http2` crate's client, on the calling core's executor: the
//! request message is framed with gRPC's 5-byte prefix into one buffer, the deadline travels
//! as `grpc-timeout` and bounds the wait, and the answer's `grpc-status` (in the trailers, or
//! in the head of a trailers-only answer) becomes a [`tonic::Status`] as tonic's client would
//! make it.

use http2::client::{Client, Error, Request};
use std::{sync::OnceLock, time::Duration};
use tonic::{Code, Status};

/// The fields every call repeats, indexed in the server's HPACK table after the first call.
pub const RECURRING: [(&[u8], &[u8]); 2] =
    [(b"content-type", b"application/grpc"), (b"te", b"trailers")];

/// RECURRING and, once the node has a CLUSTER_SECRET, the members' credential: set once at
/// start, for the life of the process (the secret is not reloaded).
static FIELDS: OnceLock<&'static [(&'static [u8], &'static [u8])]> = OnceLock::new();

/// Makes every peer call carry `credential` (`x-cluster-auth`). Call before the first peer
/// call; later calls change nothing.
pub fn set_member_credential(credential: &str) {
    let credential: &'static [u8] = Box::leak(credential.as_bytes().to_vec().into_boxed_slice());
    let fields = Box::leak(Box::new([
        RECURRING[0],
        RECURRING[1],
        (crate::security::MEMBER_HEADER, credential),
    ]));
    let _ = FIELDS.set(fields);
}

/// The fields every peer call carries.
pub fn recurring() -> &'static [(&'static [u8], &'static [u8])] {
    FIELDS.get().copied().unwrap_or(&RECURRING)
}

/// Calls `path` (`/package.Service/Method`) on the server `client` is connected to, named
/// `authority`, with `message`; waits at most `timeout`. An answer over `max_reply` bytes is
/// RESOURCE_EXHAUSTED; a connection that failed or refused the call is UNAVAILABLE (the call
/// was not processed when the server refused it, so a retry elsewhere is safe).
pub async fn unary<M, R>(
    client: &Client,
    authority: &str,
    path: &str,
    message: &M,
    timeout: Duration,
    max_reply: usize,
) -> Result<R, Status>
where
    M: prost::Message,
    R: prost::Message + Default,
{
    let len = message.encoded_len();
    let mut body = Vec::with_capacity(5 + len);
    body.push(0);
    body.extend_from_slice(&(len as u32).to_be_bytes());
    // A Vec grows as needed: encoding into it cannot fail.
    let _ = message.encode(&mut body);
    // gRPC allows 8 digits: milliseconds cover 27 hours.
    let grpc_timeout = format!("{}m", timeout.as_millis().clamp(1, 99_999_999));
    let recurring = recurring();
    let mut fields: [(&[u8], &[u8]); 4] = [(b"", b""); 4];
    fields[..recurring.len()].copy_from_slice(recurring);
    fields[recurring.len()] = (b"grpc-timeout", grpc_timeout.as_bytes());
    let fields = &fields[..recurring.len() + 1];
    let req = Request {
        method: b"POST",
        scheme: b"http",
        authority: authority.as_bytes(),
        path: path.as_bytes(),
        fields,
    };
    let call = client.request(&req, &body, max_reply.saturating_add(5));
    let answer = match glommio::timer::timeout(timeout, async { Ok(call.await) }).await {
        Ok(answer) => answer,
        Err(_) => return Err(Status::deadline_exceeded("no answer before the deadline")),
    };
    let response = answer.map_err(|e| match e {
        Error::TooLarge => {
            Status::resource_exhausted(format!("answer over the limit of {max_reply} bytes"))
        }
        Error::Reset(code) => Status::unavailable(format!("stream reset ({code:#x})")),
        other => Status::unavailable(other.to_string()),
    })?;
    if response.status != 200 {
        // gRPC over HTTP/2: a non-200 answer maps by its HTTP status.
        let code = match response.status {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502..=504 => Code::Unavailable,
            _ => Code::Unknown,
        };
        return Err(Status::new(
            code,
            format!("HTTP status {}", response.status),
        ));
    }
    let code = response
        .field(b"grpc-status")
        .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i32>().ok());
    match code {
        Some(0) => {}
        Some(code) => {
            let message = response
                .field(b"grpc-message")
                .map(percent_decode)
                .unwrap_or_default();
            return Err(Status::new(Code::from(code), message));
        }
        None => return Err(Status::internal("answer without grpc-status")),
    }
    let body = response.body;
    if body.len() < 5 || body[0] != 0 {
        return Err(Status::internal("answer without one uncompressed message"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let message = body
        .get(5..5 + len)
        .ok_or_else(|| Status::internal("answer's message cut short"))?;
    R::decode(message).map_err(|e| Status::internal(format!("undecodable answer: {e}")))
}

/// grpc-message is percent-encoded (gRPC over HTTP/2).
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            v[i],
            v.get(i + 1).and_then(|&b| hex(b)),
            v.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            super::percent_decode(b"key %22a%22 not found"),
            "key \"a\" not found"
        );
        assert_eq!(super::percent_decode(b"100%"), "100%");
        assert_eq!(super::percent_decode(b"%zz"), "%zz");
    }
}
