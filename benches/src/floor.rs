//! The floor peer (`ferry bench --peer floor`): the least work any
//! memory-to-memory migration must do on this machine, measured the way
//! ferry is.
//!
//! This file owns the floor's wire format, its sender and receiver (run as
//! two processes by the hidden `ferry floor-peer send|recv` subcommand, so
//! each has its own rusage), and [`floor_once`], one harness run of the pair.
//!
//! Sender: K threads claim 1 MiB chunks of the dataset file in turn, find
//! the chunk's non-zero 4 KiB pages (`ferry_ram::is_zero_page`, ferry's own
//! test) through a read-only mapping, and push the runs of non-zero pages
//! from the page cache on its own TCP connection (corked, so runs fill whole
//! segments): by default `splice(2)` of each run into a pipe and of the pipe
//! into the socket once per chunk ([`Method::Splice`]), or one `sendfile(2)`
//! per run ([`Method::Sendfile`]: each call pushes its few pages into TCP
//! on its own, and the sender's CPU up to the last byte measured 0.27
//! core-s/GiB against splice's 0.22 on 2 GiB `mixed`, K=2;
//! `FERRY_FLOOR_METHOD=sendfile` in `ferry bench`'s environment selects it). Receiver: fresh anonymous memory of the
//! dataset's size with `MADV_HUGEPAGE` (as ferry's destination,
//! `RamBlock::anonymous`), and K threads each `readv`ing its stream straight
//! into the runs' places. Zero pages are never sent: fresh anonymous memory
//! is already zero. After the transfer each side takes the digest of all
//! the memory (outside the timing, as ferry's two sides do) and the harness
//! compares them: equal digests or the run fails.
//!
//! Wire format, per TCP stream, all integers little-endian:
//!
//! | field | size | meaning |
//! |---|---|---|
//! | magic | 8 bytes | `FLOOR\0v1` |
//! | dataset size | u64 (8) | must equal the receiver's |
//! | then groups, each: | | |
//! | count | u64 (8) | runs in this group, 1..=[`MAX_RUNS`]; 0 ends the stream |
//! | runs | count × (offset u64 (8), length u64 (8)) | bytes of guest RAM at `offset` |
//! | payload | sum of the lengths | each run's bytes, in order |
//!
//! The dataset must not change while it is measured (the sender maps it;
//! a file truncated under it would fault the sender).
//!
//! Every offset must be page-aligned, every length non-zero and a multiple
//! of the page except a run ending exactly at the dataset's end, and every
//! run must lie inside the dataset ([`parse_runs`]): nothing from the wire
//! can make the receiver write outside its memory.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use ferry_ram::{is_zero_page, Digest, DIGEST_CHUNK};
use serde::Serialize;
use serde_json::Value;

use crate::run::{parse_json_object, run_timeout, wait_all_with_grace, Proc, TAIL_LINES};
use crate::sys::{children_cpu_s, self_cpu, tail, unix_now, Cpu};
use crate::{BenchError, Sample};

/// The stream's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"FLOOR\0v1";
/// The page the floor tests for zero and aligns runs to.
pub const PAGE: u64 = 4096;
/// Pages a sender thread claims at a time (1 MiB).
const CHUNK_PAGES: u64 = 256;
/// Most runs in one group: a chunk of alternating pages has 128.
pub const MAX_RUNS: u64 = 128;
/// Bytes of one run's header (offset, length).
const RUN_HEADER: usize = 16;
/// How long the receiver waits for its K connections, and any read for data.
const STALL: Duration = Duration::from_secs(30);
/// How long one side may run on once the other has failed.
const FAILURE_GRACE: Duration = Duration::from_secs(5);
/// What the receiver prints on stderr before the address it listens on.
pub const LISTENING: &str = "ferry floor: listening on ";

/// What went wrong in the floor peer itself.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("stream {stream}: bad hello: {msg}")]
    Hello { stream: usize, msg: String },
    #[error("stream {stream}: {count} runs in one group (at most {MAX_RUNS})")]
    TooManyRuns { stream: usize, count: u64 },
    #[error(
        "stream {stream}: run {index} (offset {offset}, length {length}) {msg} \
         (dataset {size} bytes)"
    )]
    BadRun {
        stream: usize,
        index: usize,
        offset: u64,
        length: u64,
        size: u64,
        msg: &'static str,
    },
    #[error("stream {stream}: {what}: {source}")]
    Io {
        stream: usize,
        what: &'static str,
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Setup { what: String, source: io::Error },
    #[error("the dataset {path} is {len} bytes: {msg}")]
    Dataset {
        path: PathBuf,
        len: u64,
        msg: &'static str,
    },
    #[error("a {what} thread panicked")]
    Panicked { what: &'static str },
}

/// How the sender moves a run of pages from the page cache to its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// `splice(2)` each run from the file into a pipe, and the pipe into
    /// the socket once per group (the default: fewest pushes into TCP, and
    /// the least CPU).
    Splice,
    /// One `sendfile(2)` per run.
    Sendfile,
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "splice" => Ok(Self::Splice),
            "sendfile" => Ok(Self::Sendfile),
            _ => Err(format!("'{s}': expected splice or sendfile")),
        }
    }
}

/// The 16-byte hello every stream starts with.
pub fn hello(size: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&MAGIC);
    h[8..].copy_from_slice(&size.to_le_bytes());
    h
}

/// Checks a stream's hello against the receiver's dataset size.
pub fn check_hello(stream: usize, h: &[u8; 16], size: u64) -> Result<(), FloorError> {
    if h[..8] != MAGIC {
        return Err(FloorError::Hello {
            stream,
            msg: format!("magic {:02x?}, not the floor peer's", &h[..8]),
        });
    }
    let theirs = u64::from_le_bytes(h[8..].try_into().unwrap_or([0; 8]));
    if theirs != size {
        return Err(FloorError::Hello {
            stream,
            msg: format!("the sender's dataset is {theirs} bytes, this receiver's {size}"),
        });
    }
    Ok(())
}

/// The runs of one group's header (`count` × 16 bytes), each checked to lie
/// inside a dataset of `size` bytes: offset page-aligned, length non-zero
/// and whole pages (or ending exactly at `size`), `offset + length <= size`
/// without overflow.
pub fn parse_runs(stream: usize, buf: &[u8], size: u64) -> Result<Vec<(u64, u64)>, FloorError> {
    let count = (buf.len() / RUN_HEADER) as u64;
    if count > MAX_RUNS {
        return Err(FloorError::TooManyRuns { stream, count });
    }
    let mut runs = Vec::with_capacity(buf.len() / RUN_HEADER);
    for (index, r) in buf.chunks_exact(RUN_HEADER).enumerate() {
        let word = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or([0xff; 8]));
        let (offset, length) = (word(0), word(8));
        let bad = |msg| FloorError::BadRun {
            stream,
            index,
            offset,
            length,
            size,
            msg,
        };
        let end = offset.checked_add(length).ok_or_else(|| bad("overflows"))?;
        if length == 0 {
            return Err(bad("is empty"));
        }
        if offset % PAGE != 0 {
            return Err(bad("is not page-aligned"));
        }
        if end > size {
            return Err(bad("ends past the dataset"));
        }
        if length % PAGE != 0 && end != size {
            return Err(bad("is not whole pages"));
        }
        runs.push((offset, length));
    }
    Ok(runs)
}

/// A private mapping, unmapped when dropped.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the threads that
// share it write only through raw pointers (readv into checked runs) or read
// it after every writer has been joined.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Fresh zero-filled anonymous memory, with `MADV_HUGEPAGE` as ferry's
    /// destination memory (`ram/src/block.rs: RamBlock::anonymous`).
    fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: p..p+len is the mapping just made; madvise only hints.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Ok(Self { ptr: p.cast(), len })
    }

    /// The file's first `len` bytes, read-only and shared (its page cache).
    fn file(file: &std::fs::File, len: usize) -> io::Result<Self> {
        // SAFETY: a read-only shared mapping of an open file with no address
        // hint; checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: p.cast(), len })
    }

    /// The bytes. Only while nothing writes the mapping: the sender's file
    /// mapping (a dataset that must not change while it is measured), the
    /// receiver's memory once its threads are joined.
    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable for as long as self lives;
        // callers hold it only while no thread writes it (see above).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no slice of it
        // outlives self (`bytes` borrows self).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The digest of `bytes` as ferry takes it (xxh3-64 of each
/// `DIGEST_CHUNK`, in parallel on every CPU, then xxh3-128 over them), in hex.
pub fn digest(bytes: &[u8]) -> String {
    let chunks: Vec<&[u8]> = bytes.chunks(DIGEST_CHUNK).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut hashes = vec![0u64; chunks.len()];
    std::thread::scope(|s| {
        let per = chunks.len().div_ceil(threads).max(1);
        for (hs, cs) in hashes.chunks_mut(per).zip(chunks.chunks(per)) {
            s.spawn(move || {
                for (h, c) in hs.iter_mut().zip(cs) {
                    *h = xxhash_rust::xxh3::xxh3_64(c);
                }
            });
        }
    });
    let d = Digest::from_chunk_hashes([("floor", bytes.len() as u64, &hashes[..])]);
    format!("{:032x}", d.0)
}

/// What the receiver prints (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct RecvReport {
    pub status: &'static str,
    pub size: u64,
    pub channels: u16,
    /// Runs and their bytes received over all streams.
    pub runs: u64,
    pub payload_bytes: u64,
    /// When the last stream's end marker was read: every byte placed.
    pub finished_at_unix: f64,
    /// This process's CPU time at that moment (before the digest).
    pub transfer_cpu: Cpu,
    /// The digest of all the memory, taken after `finished_at_unix`.
    pub digest: String,
}

/// What the sender prints (one JSON object on stdout).
#[derive(Debug, Serialize)]
pub struct SendReport {
    pub status: &'static str,
    pub size: u64,
    pub channels: u16,
    pub method: Method,
    pub nonzero_pages: u64,
    pub runs: u64,
    /// Bytes of guest RAM sent, and with the hellos and headers.
    pub payload_bytes: u64,
    pub wire_bytes: u64,
    /// This process's CPU time once every stream was sent (before the digest).
    pub transfer_cpu: Cpu,
    /// The digest of the whole dataset, taken after the transfer.
    pub digest: String,
}

fn set_congestion(
    stream: usize,
    s: socket2::SockRef<'_>,
    cc: Option<&str>,
) -> Result<(), FloorError> {
    if let Some(cc) = cc {
        s.set_tcp_congestion(cc.as_bytes())
            .map_err(|source| FloorError::Io {
                stream,
                what: "setting TCP_CONGESTION",
                source,
            })?;
    }
    Ok(())
}

/// Receives one floor migration of a `size`-byte dataset over `channels`
/// connections to 127.0.0.1 (any port); `listening` is told the address
/// before the first accept.
pub fn receive(
    size: u64,
    channels: u16,
    congestion: Option<&str>,
    listening: impl FnOnce(SocketAddr),
) -> Result<RecvReport, FloorError> {
    let setup = |what: &str| {
        let what = what.to_string();
        move |source| FloorError::Setup { what, source }
    };
    let len = usize::try_from(size)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| setup("the dataset size")(io::Error::other(format!("{size} bytes"))))?;
    let channels = channels.max(1);
    let mem = Mapping::anonymous(len).map_err(setup("mapping the receiver's memory"))?;
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .map_err(setup("listening on 127.0.0.1"))?;
    // Accepted sockets inherit the listener's congestion control.
    set_congestion(0, socket2::SockRef::from(&listener), congestion)?;
    listening(
        listener
            .local_addr()
            .map_err(setup("the listening address"))?,
    );
    listener
        .set_nonblocking(true)
        .map_err(setup("making the listener non-blocking"))?;
    let deadline = Instant::now() + STALL;
    let mut streams = Vec::with_capacity(usize::from(channels));
    while streams.len() < usize::from(channels) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(setup("a connection"))?;
                s.set_read_timeout(Some(STALL))
                    .map_err(setup("a connection"))?;
                streams.push(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(setup(&format!(
                        "waiting for connection {} of {channels}",
                        streams.len() + 1
                    ))(io::ErrorKind::TimedOut.into()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                return Err(setup(&format!(
                    "accepting connection {} of {channels}",
                    streams.len() + 1
                ))(e))
            }
        }
    }
    let results: Vec<Result<(u64, u64), FloorError>> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(i, stream)| {
                let mem = &mem;
                s.spawn(move || {
                    let r = receive_stream(i, stream, mem, size);
                    if r.is_err() {
                        // Tell the sender now rather than when the others end.
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(FloorError::Panicked { what: "receiver" }))
            })
            .collect()
    });
    let finished_at_unix = unix_now();
    let transfer_cpu = self_cpu().map_err(setup("getrusage"))?;
    let (mut runs, mut payload_bytes) = (0, 0);
    for r in results {
        let (n, b) = r?;
        runs += n;
        payload_bytes += b;
    }
    Ok(RecvReport {
        status: "completed",
        size,
        channels,
        runs,
        payload_bytes,
        finished_at_unix,
        transfer_cpu,
        digest: digest(mem.bytes()),
    })
}

/// One stream into `mem`: hello, then groups until the end marker; returns
/// the runs and bytes it placed.
fn receive_stream(
    i: usize,
    mut stream: &TcpStream,
    mem: &Mapping,
    size: u64,
) -> Result<(u64, u64), FloorError> {
    let io = |what: &'static str| {
        move |source| FloorError::Io {
            stream: i,
            what,
            source,
        }
    };
    let mut h = [0u8; 16];
    stream.read_exact(&mut h).map_err(io("reading the hello"))?;
    check_hello(i, &h, size)?;
    let mut header = vec![0u8; MAX_RUNS as usize * RUN_HEADER];
    let (mut runs, mut bytes) = (0u64, 0u64);
    loop {
        let mut c = [0u8; 8];
        stream
            .read_exact(&mut c)
            .map_err(io("reading a group's count"))?;
        let count = u64::from_le_bytes(c);
        if count == 0 {
            return Ok((runs, bytes));
        }
        if count > MAX_RUNS {
            return Err(FloorError::TooManyRuns { stream: i, count });
        }
        let header = &mut header[..count as usize * RUN_HEADER];
        stream
            .read_exact(header)
            .map_err(io("reading a group's runs"))?;
        let group = parse_runs(i, header, size)?;
        // Every run lies inside mem (parse_runs checked it against size,
        // which is mem's length).
        let mut iov: Vec<libc::iovec> = group
            .iter()
            .map(|&(off, len)| libc::iovec {
                // SAFETY: off + len <= size == mem.len, so the pointer stays
                // inside the mapping (wrapping_add would do as well: no
                // reference is made).
                iov_base: unsafe { mem.ptr.add(off as usize) }.cast(),
                iov_len: len as usize,
            })
            .collect();
        read_vectored_exact(stream.as_raw_fd(), &mut iov).map_err(io("reading pages"))?;
        runs += count;
        bytes += group.iter().map(|r| r.1).sum::<u64>();
    }
}

/// readv until every iovec is full.
fn read_vectored_exact(fd: i32, iov: &mut [libc::iovec]) -> io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        let n = (iov.len() - first).min(1024);
        // SAFETY: iov[first..first + n] describe writable memory inside the
        // receiver's mapping (checked runs); the kernel writes through them,
        // no Rust reference to that memory exists while it does.
        let got = unsafe { libc::readv(fd, iov[first..].as_ptr(), n as libc::c_int) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut got = got as usize;
        while got > 0 {
            let v = &mut iov[first];
            if got >= v.iov_len {
                got -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(got).cast();
                v.iov_len -= got;
                got = 0;
            }
        }
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

/// Sends one floor migration of the dataset file to `to` over `channels`
/// connections.
pub fn send(
    dataset: &Path,
    to: SocketAddr,
    channels: u16,
    congestion: Option<&str>,
    method: Method,
) -> Result<SendReport, FloorError> {
    let setup = |what: String| move |source| FloorError::Setup { what, source };
    let file =
        std::fs::File::open(dataset).map_err(setup(format!("opening {}", dataset.display())))?;
    let size = file
        .metadata()
        .map_err(setup(format!("reading {}", dataset.display())))?
        .len();
    let len = usize::try_from(size)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| FloorError::Dataset {
            path: dataset.into(),
            len: size,
            msg: "empty or too large to map",
        })?;
    let map = Mapping::file(&file, len).map_err(setup(format!("mapping {}", dataset.display())))?;
    let channels = channels.max(1);
    let mut streams = Vec::new();
    for i in 0..usize::from(channels) {
        let s = TcpStream::connect(to).map_err(setup(format!("connecting stream {i} to {to}")))?;
        set_congestion(i, socket2::SockRef::from(&s), congestion)?;
        set_cork(&s, true).map_err(|source| FloorError::Io {
            stream: i,
            what: "setting TCP_CORK",
            source,
        })?;
        streams.push(s);
    }
    let next = AtomicU64::new(0);
    let results: Vec<Result<Counts, FloorError>> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(i, stream)| {
                let (map, file, next) = (&map, &file, &next);
                s.spawn(move || send_stream(i, stream, file, map.bytes(), next, method))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(FloorError::Panicked { what: "sender" }))
            })
            .collect()
    });
    let transfer_cpu = self_cpu().map_err(setup("getrusage".into()))?;
    let mut total = Counts::default();
    for r in results {
        let c = r?;
        total.pages += c.pages;
        total.runs += c.runs;
        total.payload += c.payload;
        total.wire += c.wire;
    }
    Ok(SendReport {
        status: "completed",
        size,
        channels,
        method,
        nonzero_pages: total.pages,
        runs: total.runs,
        payload_bytes: total.payload,
        wire_bytes: total.wire,
        transfer_cpu,
        digest: digest(map.bytes()),
    })
}

#[derive(Default)]
struct Counts {
    pages: u64,
    runs: u64,
    payload: u64,
    wire: u64,
}

fn set_cork(s: &TcpStream, on: bool) -> io::Result<()> {
    let v: libc::c_int = on.into();
    // SAFETY: setsockopt reads sizeof(c_int) bytes from &v, which lives
    // across the call; the fd is the stream's, open while `s` is borrowed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One stream: hello, then for every chunk it claims a group of its runs of
/// non-zero pages (header by `send`, pages by `sendfile`), then the end
/// marker; uncorks and shuts the stream down.
fn send_stream(
    i: usize,
    stream: &TcpStream,
    file: &std::fs::File,
    map: &[u8],
    next: &AtomicU64,
    method: Method,
) -> Result<Counts, FloorError> {
    let io = |what: &'static str| {
        move |source| FloorError::Io {
            stream: i,
            what,
            source,
        }
    };
    let fd = stream.as_raw_fd();
    let mut pipe = match method {
        Method::Splice => Some(Pipe::new().map_err(io("making a pipe"))?),
        Method::Sendfile => None,
    };
    let size = map.len() as u64;
    let chunks = size.div_ceil(CHUNK_PAGES * PAGE);
    let mut c = Counts::default();
    send_all(fd, &hello(size), libc::MSG_MORE).map_err(io("sending the hello"))?;
    c.wire += 16;
    let mut runs: Vec<(u64, u64)> = Vec::with_capacity(MAX_RUNS as usize);
    let mut header = Vec::with_capacity(8 + MAX_RUNS as usize * RUN_HEADER);
    loop {
        let chunk = next.fetch_add(1, Ordering::Relaxed);
        if chunk >= chunks {
            break;
        }
        runs.clear();
        let start = chunk * CHUNK_PAGES * PAGE;
        let end = (start + CHUNK_PAGES * PAGE).min(size);
        let mut off = start;
        while off < end {
            let page_end = (off + PAGE).min(end);
            if !is_zero_page(&map[off as usize..page_end as usize]) {
                c.pages += 1;
                match runs.last_mut() {
                    Some(r) if r.0 + r.1 == off => r.1 += page_end - off,
                    _ => runs.push((off, page_end - off)),
                }
            }
            off = page_end;
        }
        if runs.is_empty() {
            continue;
        }
        header.clear();
        header.extend_from_slice(&(runs.len() as u64).to_le_bytes());
        for &(o, l) in &runs {
            header.extend_from_slice(&o.to_le_bytes());
            header.extend_from_slice(&l.to_le_bytes());
        }
        send_all(fd, &header, libc::MSG_MORE).map_err(io("sending a group's runs"))?;
        match pipe.as_mut() {
            Some(p) => {
                for &(o, l) in &runs {
                    p.fill(file.as_raw_fd(), o, l, fd)
                        .map_err(io("splicing pages"))?;
                }
                p.drain(fd).map_err(io("splicing pages"))?;
            }
            None => {
                for &(o, l) in &runs {
                    sendfile_all(fd, file.as_raw_fd(), o, l).map_err(io("sendfile"))?;
                }
            }
        }
        c.runs += runs.len() as u64;
        let payload: u64 = runs.iter().map(|r| r.1).sum();
        c.payload += payload;
        c.wire += header.len() as u64 + payload;
    }
    send_all(fd, &0u64.to_le_bytes(), 0).map_err(io("sending the end marker"))?;
    c.wire += 8;
    set_cork(stream, false).map_err(io("clearing TCP_CORK"))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(io("shutting the stream down"))?;
    Ok(c)
}

fn send_all(fd: i32, mut buf: &[u8], flags: libc::c_int) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a live slice; send reads at most buf.len() bytes.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                flags | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// A pipe that carries a group's runs from the page cache to the socket:
/// each run is spliced in (the pages by reference), and the pipe is
/// spliced out to the socket when full and at the end of the group.
struct Pipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
    /// Bytes in the pipe not yet spliced to the socket.
    held: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into the array, which lives across the call.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd;
        // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
        let (r, w) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        // A whole chunk's pages in one pipe where the system allows (1 MiB
        // is the default pipe-max-size); smaller pipes only drain more often.
        // SAFETY: F_SETPIPE_SZ on an open pipe fd; failure is harmless.
        unsafe {
            libc::fcntl(
                w.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                (CHUNK_PAGES * PAGE) as libc::c_int,
            )
        };
        Ok(Self { r, w, held: 0 })
    }

    /// Splices `len` bytes of `file` at `offset` into the pipe, draining
    /// it into `sock` whenever it is full.
    fn fill(&mut self, file: i32, offset: u64, len: u64, sock: i32) -> io::Result<()> {
        let mut off = libc::loff_t::try_from(offset).map_err(io::Error::other)?;
        let mut left = len as usize;
        while left > 0 {
            // SAFETY: `off` is a live loff_t the kernel advances; the file
            // and the pipe's write end are open for the call. Non-blocking
            // on the pipe: a full pipe is drained below, never waited on.
            let n = unsafe {
                libc::splice(
                    file,
                    &mut off,
                    self.w.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if self.held > 0 => {
                        self.drain(sock)?;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the dataset file ended early",
                ));
            }
            self.held += n as usize;
            left -= n as usize;
        }
        Ok(())
    }

    /// Splices everything in the pipe into `sock`.
    fn drain(&mut self, sock: i32) -> io::Result<()> {
        while self.held > 0 {
            // SAFETY: the pipe's read end and the socket are open for the
            // call; no offsets (both are streams).
            let n = unsafe {
                libc::splice(
                    self.r.as_raw_fd(),
                    std::ptr::null_mut(),
                    sock,
                    std::ptr::null_mut(),
                    self.held,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.held -= n as usize;
        }
        Ok(())
    }
}

fn sendfile_all(sock: i32, file: i32, offset: u64, len: u64) -> io::Result<()> {
    let mut off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: `off` is a live off_t the kernel advances; both fds are
        // open for the call (the socket's and the dataset file's).
        let n = unsafe { libc::sendfile(sock, file, &mut off, left) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the dataset file ended early",
            ));
        }
        left -= n as usize;
    }
    Ok(())
}

/// One floor run as the harness measures it: `ferry floor-peer recv`, then
/// `ferry floor-peer send`, both reaped with their own CPU time; wall time
/// from just before `send` was spawned until the receiver's
/// `finished_at_unix` (ferry's method); the digests of both sides must match.
pub(crate) fn floor_once(
    exe: &Path,
    dataset: &Path,
    size: u64,
    channels: u16,
    congestion: Option<&str>,
) -> Result<Sample, BenchError> {
    let fail = |failures: Vec<String>| BenchError::FloorFailed { channels, failures };
    let cpu_err = |source| BenchError::Process {
        process: "getrusage".into(),
        source,
    };
    let timeout = run_timeout(size);
    let cc = congestion.unwrap_or("system");
    let cpu0 = children_cpu_s().map_err(cpu_err)?;
    let born = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.args(["floor-peer", "recv", "--size", &size.to_string()])
        .args(["--channels", &channels.to_string(), "--tcp-congestion", cc]);
    let (tx, rx) = mpsc::channel();
    let mut recv = Proc::spawn("floor recv", cmd, Some(tx))?;
    let deadline = Instant::now() + crate::run::LISTEN_TIMEOUT;
    let addr = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(a) = line.trim().strip_prefix(LISTENING) {
                    break a.trim().to_string();
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                recv.kill();
                return Err(fail(vec![format!(
                    "floor recv printed no '{LISTENING}' line; stderr tail:\n{}",
                    tail(&recv.stderr_so_far(), TAIL_LINES)
                )]));
            }
        }
    };
    drop(rx);
    let t0 = unix_now();
    let mut cmd = Command::new(exe);
    cmd.args(["floor-peer", "send", "--dataset"])
        .arg(dataset)
        .args(["--to", &addr, "--channels", &channels.to_string()])
        .args(["--tcp-congestion", cc]);
    // For A/B runs of the two ways of sending (see [`Method`]).
    if let Some(m) = std::env::var_os("FERRY_FLOOR_METHOD") {
        cmd.arg("--method").arg(m);
    }
    let mut send = Proc::spawn("floor send", cmd, None)?;
    let what = format!("floor run with {channels} channel(s)");
    let died = wait_all_with_grace(
        &mut [&mut recv, &mut send],
        born + timeout,
        &what,
        timeout,
        Some(FAILURE_GRACE),
    )?;
    let cpu1 = children_cpu_s().map_err(cpu_err)?;
    let lifetime = died.duration_since(born).as_secs_f64();
    let (recv, send) = (recv.finish()?, send.finish()?);
    let side = |name: &str, fin: &crate::run::Finished| -> Result<Value, String> {
        let json = parse_json_object(&fin.stdout).filter(|j| j["status"] == "completed");
        match json {
            Some(j) if fin.status.success() => Ok(j),
            _ => Err(format!(
                "{name}: {}; stdout: {}; stderr tail:\n{}",
                fin.status,
                fin.stdout.trim(),
                tail(&fin.stderr, TAIL_LINES)
            )),
        }
    };
    let (sent, held) = match (side("floor send", &send), side("floor recv", &recv)) {
        (Ok(s), Ok(h)) => (s, h),
        (s, h) => return Err(fail([s.err(), h.err()].into_iter().flatten().collect())),
    };
    let (ds, dh) = (sent["digest"].as_str(), held["digest"].as_str());
    if ds.is_none() || ds != dh {
        return Err(fail(vec![format!(
            "the received memory differs from the dataset: sender's digest {}, receiver's {}",
            ds.unwrap_or("(none)"),
            dh.unwrap_or("(none)")
        )]));
    }
    let wall = held["finished_at_unix"].as_f64().map(|f| f - t0);
    let Some(wall) = wall.filter(|w| *w > 0.0) else {
        return Err(fail(vec![format!(
            "floor recv's finished_at_unix {} is not after the send was started ({t0:.6})",
            held["finished_at_unix"]
        )]));
    };
    let wire = sent["wire_bytes"].as_u64().unwrap_or(0);
    // Each side's CPU up to its last byte (before its digest).
    let transfer_cpu = |v: &Value| {
        Some(v["transfer_cpu"]["user_s"].as_f64()? + v["transfer_cpu"]["sys_s"].as_f64()?)
    };
    let (send_transfer, recv_transfer) = (transfer_cpu(&sent), transfer_cpu(&held));
    let detail = serde_json::json!({ "t0_unix": t0, "send": sent, "recv": held });
    Ok(Sample::new(
        wall,
        size,
        wire,
        Some(((cpu1 - cpu0).max(0.0), lifetime)),
        detail,
    )
    .with_sides(send.cpu, recv.cpu)
    .with_migration_cpu(send_transfer, recv_transfer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(runs: &[(u64, u64)]) -> Vec<u8> {
        runs.iter()
            .flat_map(|&(o, l)| o.to_le_bytes().into_iter().chain(l.to_le_bytes()))
            .collect()
    }

    #[test]
    fn runs_inside_the_dataset_are_accepted() {
        let size = 16 * PAGE + 100; // a short last page
        let ok = [
            (0, PAGE),
            (PAGE, 3 * PAGE),
            (16 * PAGE, 100),
            (4 * PAGE, 12 * PAGE + 100),
        ];
        assert_eq!(parse_runs(0, &header(&ok), size).expect("good runs"), ok);
        assert!(parse_runs(0, &[], size).expect("empty group").is_empty());
    }

    #[test]
    fn runs_outside_the_dataset_or_misshapen_are_refused() {
        let size = 16 * PAGE;
        let bad: [((u64, u64), &str); 7] = [
            ((0, 0), "is empty"),
            ((1, PAGE), "is not page-aligned"),
            ((16 * PAGE, PAGE), "ends past the dataset"),
            ((15 * PAGE, 2 * PAGE), "ends past the dataset"),
            ((u64::MAX - PAGE + 1, PAGE), "overflows"),
            ((PAGE, u64::MAX), "overflows"),
            ((0, PAGE + 1), "is not whole pages"),
        ];
        for (run, why) in bad {
            // The bad run second: every run of a group is checked.
            let h = header(&[(0, PAGE), run]);
            match parse_runs(3, &h, size) {
                Err(FloorError::BadRun {
                    stream: 3,
                    index: 1,
                    msg,
                    ..
                }) => assert_eq!(msg, why, "{run:?}"),
                other => panic!("{run:?}: expected BadRun, got {other:?}"),
            }
        }
        let many = header(&vec![(0, PAGE); MAX_RUNS as usize + 1]);
        assert!(matches!(
            parse_runs(0, &many, size),
            Err(FloorError::TooManyRuns { .. })
        ));
    }

    #[test]
    fn hello_is_checked() {
        assert!(check_hello(0, &hello(4096), 4096).is_ok());
        assert!(check_hello(0, &hello(8192), 4096).is_err());
        let mut h = hello(4096);
        h[0] = b'X';
        assert!(check_hello(0, &h, 4096).is_err());
    }

    /// A short stream: hello, a group whose run ends past the memory.
    #[test]
    fn a_receiver_refuses_a_run_outside_its_memory() {
        let size = 8 * PAGE;
        let (tx, rx) = mpsc::channel();
        let recv =
            std::thread::spawn(move || receive(size, 1, None, |a| tx.send(a).expect("addr")));
        let addr = rx.recv().expect("listening");
        let mut s = TcpStream::connect(addr).expect("connect");
        let mut msg = hello(size).to_vec();
        msg.extend_from_slice(&1u64.to_le_bytes());
        msg.extend(header(&[(8 * PAGE, PAGE)]));
        msg.extend(vec![7u8; PAGE as usize]);
        std::io::Write::write_all(&mut s, &msg).expect("write");
        let e = recv.join().expect("join");
        assert!(
            matches!(
                e,
                Err(FloorError::BadRun {
                    msg: "ends past the dataset",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    /// Sender and receiver in one process over loopback, K=2, both ways
    /// of sending: the memory ends up equal to the file, zero pages unsent.
    #[test]
    fn send_and_receive_in_process() {
        for method in [Method::Splice, Method::Sendfile] {
            send_and_receive(method);
        }
    }

    fn send_and_receive(method: Method) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data.ram");
        let size = 4 << 20;
        ferry_ram::pattern::write_file(&path, size, ferry_ram::pattern::Pattern::Mixed, 3)
            .expect("dataset");
        let (tx, rx) = mpsc::channel();
        let recv =
            std::thread::spawn(move || receive(size, 2, None, |a| tx.send(a).expect("addr")));
        let addr = rx.recv().expect("listening");
        let sent = send(&path, addr, 2, None, method).expect("send");
        let held = recv.join().expect("join").expect("receive");
        assert_eq!(sent.digest, held.digest);
        assert_eq!(sent.digest, digest(&std::fs::read(&path).expect("read")));
        assert_eq!(sent.payload_bytes, held.payload_bytes);
        assert_eq!(sent.runs, held.runs);
        // mixed: one page in four is zero.
        assert_eq!(sent.nonzero_pages, size / PAGE * 3 / 4);
        assert_eq!(sent.payload_bytes, sent.nonzero_pages * PAGE);
    }
}
