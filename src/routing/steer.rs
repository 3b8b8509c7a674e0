//! Connections that land on a chosen core: the shard-aware port, as ScyllaDB's (19042).
//!
//! ADDR is served by every core with SO_REUSEPORT, and the kernel spreads its connections by a
//! hash of their addresses: a client cannot choose the core it lands on. The shard-aware port
//! is a second reuseport group of one listener per core, created in core order, with a
//! classic BPF program attached that picks the listener from the connection's source port:
//! **core = source port mod cores**. A client that binds its source port before connecting
//! (peers, for their replica calls) reaches the core that owns the keys it carries, so a
//! replica never hops; a client that does not lands on a core as evenly as with ADDR.
//! The listeners are made on the main thread at start; a peer's connect runs on its core
//! executor's blocking thread.
//!
//! Why this and not a port per core: one port to open in a firewall and to advertise, however
//! many cores; and why not eBPF: a classic program needs no verifier-friendly toolchain or
//! capability beyond the socket's own, and has been accepted by every kernel since 4.5.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::{
    io,
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

/// The core of a node with `cores` cores that a connection from `source_port` lands on.
pub fn core_of(source_port: u16, cores: u32) -> u32 {
    source_port as u32 % cores.max(1)
}

/// One listener per core on `addr`'s host and `port` (0: one the kernel picks), in core
/// order, steered by source port. Returns the port and the listeners (index = core).
pub fn listen(addr: SocketAddr, port: u16, cores: usize) -> io::Result<(u16, Vec<OwnedFd>)> {
    let mut addr = addr;
    addr.set_port(port);
    let mut listeners: Vec<Socket> = Vec::with_capacity(cores);
    for _ in 0..cores {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_port(true)?;
        socket.set_reuse_address(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&SockAddr::from(addr))?;
        // The group's order is the order of listen(): listener i is core i's.
        socket.listen(1024)?;
        if addr.port() == 0 {
            addr = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("the shard-aware listener has no address"))?;
        }
        listeners.push(socket);
    }
    if let Some(first) = listeners.first() {
        attach_steering(first, cores as u32)?;
    }
    Ok((
        addr.port(),
        listeners.into_iter().map(OwnedFd::from).collect(),
    ))
}

/// Classic BPF instruction (linux/filter.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// Loads relative to the network header (SKF_NET_OFF): the program runs with the packet's
/// data past the TCP header, where a SYN has nothing.
const NET: u32 = (-0x100000i32) as u32;

/// Attaches `source port mod cores` to the reuseport group of `socket`.
fn attach_steering(socket: &Socket, cores: u32) -> io::Result<()> {
    const LD: u16 = 0x00;
    const LDX: u16 = 0x01;
    const ALU: u16 = 0x04;
    const JMP: u16 = 0x05;
    const RET: u16 = 0x06;
    const H: u16 = 0x08;
    const B: u16 = 0x10;
    const ABS: u16 = 0x20;
    const IND: u16 = 0x40;
    const MSH: u16 = 0xa0;
    const RSH: u16 = 0x70;
    const MOD: u16 = 0x90;
    const JEQ: u16 = 0x10;
    const JA: u16 = 0x00;
    const K: u16 = 0x00;
    const A: u16 = 0x10;
    let op = |code, k| SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let program = [
        // The IP version, from the first byte of the network header.
        op(LD | B | ABS, NET),
        op(ALU | RSH | K, 4),
        SockFilter {
            code: JMP | JEQ | K,
            jt: 3, // IPv6
            jf: 0,
            k: 6,
        },
        // IPv4: X = the header's length, then the source port right after it.
        op(LDX | B | MSH, NET),
        op(LD | H | IND, NET),
        op(JMP | JA, 1),
        // IPv6: the source port after the fixed 40-byte header.
        op(LD | H | ABS, NET.wrapping_add(40)),
        op(ALU | MOD | K, cores.max(1)),
        op(RET | A, 0),
    ];
    let prog = SockFprog {
        len: program.len() as u16,
        filter: program.as_ptr(),
    };
    // SAFETY: `prog` points at `program`, both alive for the call; the kernel copies them.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const SockFprog).cast(),
            std::mem::size_of::<SockFprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The local ports connect() may use (Linux's ip_local_port_range, or its default).
fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(lo, hi)| lo < hi)
        .unwrap_or((32768, 60999))
}

/// Connects to `addr`, a shard-aware port of a node with `cores` cores, from a source port
/// that lands on `core`. Blocking: run it off the executor.
pub fn connect_to_core(
    addr: SocketAddr,
    core: u32,
    cores: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let (lo, hi) = local_port_range();
    // Start anywhere in the range, so nodes that start together do not all try one port.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let span = (hi - lo) as u32 + 1;
    let mut port = placement::port_for_core((lo as u32 + seed % span) as u16, core, cores, lo, hi);
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no free source port");
    for _ in 0..64 {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // A port whose earlier connection is in TIME_WAIT may be bound again.
        socket.set_reuse_address(true)?;
        let mut from = local;
        from.set_port(port);
        match socket.bind(&SockAddr::from(from)) {
            Ok(()) => match socket.connect_timeout(&SockAddr::from(addr), timeout) {
                Ok(()) => {
                    socket.set_tcp_nodelay(true)?;
                    return Ok(socket.into());
                }
                // This 4-tuple is taken (a connection from the port to the same peer).
                Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => last = e,
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
        port = placement::port_for_core(port.saturating_add(1), core, cores, lo, hi);
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Real sockets on loopback: each connection from a chosen source port is accepted by the
    /// listener of the core that port names, for every core.
    #[test]
    fn a_connection_lands_on_the_listener_its_source_port_names() {
        let cores = 3;
        let (port, listeners) = listen("127.0.0.1:0".parse().unwrap(), 0, cores).unwrap();
        let listeners: Vec<std::net::TcpListener> = listeners
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect();
        for l in &listeners {
            l.set_nonblocking(true).unwrap();
        }
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        for round in 0..4 {
            for core in 0..cores as u32 {
                let mut conn =
                    connect_to_core(addr, core, cores as u32, Duration::from_secs(2)).unwrap();
                let source = conn.local_addr().unwrap().port();
                assert_eq!(core_of(source, cores as u32), core);
                conn.write_all(&[round as u8]).unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let got = loop {
                    let ready: Vec<usize> = (0..cores)
                        .filter_map(|i| {
                            listeners[i].accept().ok().map(|(mut s, _)| {
                                let mut b = [0u8; 1];
                                s.set_nonblocking(false).unwrap();
                                s.read_exact(&mut b).unwrap();
                                assert_eq!(b[0], round as u8);
                                i
                            })
                        })
                        .collect();
                    if !ready.is_empty() {
                        break ready;
                    }
                    assert!(std::time::Instant::now() < deadline, "never accepted");
                    std::thread::sleep(Duration::from_millis(1));
                };
                assert_eq!(got, [core as usize], "source port {source}");
            }
        }
    }
}
