//! Reads TCP payloads out of a classic pcap file (Ethernet, IPv4/IPv6), as `tcpdump -w` writes it.
//!
//! Hand-written rather than a crate: the tests need only "which TCP ports carried which bytes",
//! which is forty lines over a fixed, documented format; a parser crate would add more to build
//! than it saves.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub struct Segment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

pub fn tcp_segments(file: &[u8]) -> Result<Vec<Segment>> {
    if file.len() < 24 {
        bail!("pcap file too short ({} bytes)", file.len());
    }
    let le = match file[0..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file"),
    };
    let u32_at = |b: &[u8], o: usize| {
        let w = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    if u32_at(file, 20) != 1 {
        bail!("pcap link type {} is not Ethernet", u32_at(file, 20));
    }
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= file.len() {
        let incl = u32_at(file, off + 8) as usize;
        let start = off + 16;
        let end = (start + incl).min(file.len());
        if let Some(s) = parse_frame(&file[start..end]) {
            out.push(s);
        }
        off = start + incl;
    }
    Ok(out)
}

fn parse_frame(f: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let v4 = |o: usize| -> Option<IpAddr> { Some(IpAddr::from(<[u8; 4]>::try_from(f.get(o..o + 4)?).ok()?)) };
    let v6 = |o: usize| -> Option<IpAddr> { Some(IpAddr::from(<[u8; 16]>::try_from(f.get(o..o + 16)?).ok()?)) };
    let (proto, l4, src, dst) = match ethertype {
        0x0800 => {
            let ihl = (*f.get(14)? & 0x0f) as usize * 4;
            (*f.get(14 + 9)?, 14 + ihl, v4(14 + 12)?, v4(14 + 16)?)
        }
        0x86dd => (*f.get(14 + 6)?, 14 + 40, v6(14 + 8)?, v6(14 + 24)?),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let tcp = f.get(l4..)?;
    let data_off = (*tcp.get(12)? >> 4) as usize * 4;
    Some(Segment {
        src,
        dst,
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        payload: tcp.get(data_off..)?.to_vec(),
    })
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A tcpdump capture of one node's link to the other nodes, running until [`Dump::finish`].
pub struct Dump {
    pid: u32,
    node: usize,
    path: std::path::PathBuf,
}

/// The port on the control-plane host a capture's end marker is sent to: nothing listens there,
/// so the marker is one SYN out and a reset back.
const MARKER_PORT: u16 = 9;

impl Dump {
    /// Starts capturing everything on `node`'s eth0, and waits until tcpdump listens.
    pub fn start(tb: &crate::Testbed, node: usize, name: &str) -> Result<Dump> {
        let path = tb.dir.join(format!("{name}.pcap"));
        let log = tb.dir.join(format!("{name}.tcpdump.log"));
        let pid = tb.spawn(
            tb.node(node)
                .netns
                .command("tcpdump", None)?
                .args(["-i", "eth0", "-n", "-s", "0", "-U", "--immediate-mode", "-Z", "root", "-w"])
                .arg(&path)
                .stderr(std::fs::File::create(&log)?),
        )?;
        let started = crate::wait_for(std::time::Duration::from_secs(10), || {
            std::fs::read_to_string(&log).ok()?.contains("listening on").then_some(())
        });
        if started.is_none() {
            bail!("tcpdump did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        Ok(Dump { pid, node, path })
    }

    /// Stops the capture and returns its TCP segments: everything the node's link carried until
    /// now. A marker connection is sent out of the node last, and the capture stops only once
    /// tcpdump has written it (and so everything before it).
    pub fn finish(self, tb: &crate::Testbed) -> Result<Vec<Segment>> {
        let marker = send_marker(&tb.node(self.node).netns)?;
        let written = crate::wait_for(Duration::from_secs(10), || {
            let segs = tcp_segments(&std::fs::read(&self.path).ok()?).ok()?;
            segs.iter().any(|s| s.src_port == marker && s.dst_port == MARKER_PORT).then_some(())
        });
        tb.stop(self.pid);
        if written.is_none() {
            bail!("the capture's end marker (port {marker} → {MARKER_PORT}) was not written within 10 s");
        }
        tcp_segments(&std::fs::read(&self.path)?)
    }
}

/// Connects from `ns` to a closed port of the control-plane host; returns the source port used.
fn send_marker(ns: &crate::Netns) -> Result<u16> {
    let netns = std::fs::File::open(ns.path()).with_context(|| format!("opening netns {}", ns.name))?;
    // setns(2) moves only the calling thread: a thread of its own, which ends right after.
    let joined = std::thread::spawn(move || -> std::io::Result<u16> {
        // SAFETY: setns(2) on a namespace descriptor this thread owns; it affects this thread only.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let to = SocketAddr::new(crate::CONTROL_IPV4.into(), MARKER_PORT);
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.bind(&SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0).into())?;
        let port = sock.local_addr()?.as_socket().map(|a| a.port()).unwrap_or(0);
        // Refused (a reset) is the expected answer; the SYN went out either way.
        let _ = sock.connect_timeout(&to.into(), Duration::from_secs(2));
        Ok(port)
    });
    let port = joined.join().map_err(|_| anyhow::anyhow!("the marker thread panicked"))??;
    Ok(port)
}

/// Whether any segment's payload contains `needle` (bytes split across segments are joined too).
pub fn seen(segs: &[Segment], needle: &str) -> bool {
    let all: Vec<u8> = segs.iter().flat_map(|s| s.payload.iter().copied()).collect();
    contains(&all, needle.as_bytes())
}
