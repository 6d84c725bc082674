//! Reads TCP payloads out of a classic pcap file (Ethernet, IPv4/IPv6), as `tcpdump -w` writes it.
//!
//! Hand-written rather than a crate: the tests need only "which TCP ports carried which bytes",
//! which is forty lines over a fixed, documented format; a parser crate would add more to build
//! than it saves.

use anyhow::{bail, Result};

pub struct Segment {
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
    let (proto, l4) = match ethertype {
        0x0800 => {
            let ihl = (*f.get(14)? & 0x0f) as usize * 4;
            (*f.get(14 + 9)?, 14 + ihl)
        }
        0x86dd => (*f.get(14 + 6)?, 14 + 40),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let tcp = f.get(l4..)?;
    let data_off = (*tcp.get(12)? >> 4) as usize * 4;
    Some(Segment {
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
    path: std::path::PathBuf,
}

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
        Ok(Dump { pid, path })
    }

    /// Stops the capture and returns its TCP segments.
    pub fn finish(self, tb: &crate::Testbed) -> Result<Vec<Segment>> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        tb.stop(self.pid);
        tcp_segments(&std::fs::read(&self.path)?)
    }
}

/// Whether any segment's payload contains `needle` (bytes split across segments are joined too).
pub fn seen(segs: &[Segment], needle: &str) -> bool {
    let all: Vec<u8> = segs.iter().flat_map(|s| s.payload.iter().copied()).collect();
    contains(&all, needle.as_bytes())
}
