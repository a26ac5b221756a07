//! One HTTP request to the node agent over its Unix socket. HTTP/1.1 with
//! `Connection: close` is a few lines; a client library would be most of
//! this small binary.
use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    time::Duration,
};

/// POSTs `body` (JSON) to `path`; the reply's status and body.
pub fn post(socket: &str, path: &str, body: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: mesh-node\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP reply");
    let status = reply.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}
