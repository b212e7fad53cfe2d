//! Bad input and faults on the wire: each must end the migration with an
//! error that names the channel (and block and offset where they apply),
//! never a panic, a hang, or a write outside guest memory.
//!
//! The source here is driven by hand over real sockets: real handshakes and
//! setup, then exactly the bytes each test wants on the multifd channel.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry::protocol::{MainChannel, Message, Setup, CAP_CHECKSUM, CAP_VERIFY, CAP_ZSTD};
use ferry::{
    migrate_out, AcceptOptions, DestinationMemory, IncomingOptions, OutgoingOptions, Progress,
};
use ferry_multifd::packet::{
    bytes_crc, offsets_as_bytes, FLAG_CHECKSUM, FLAG_COMPRESSED, FLAG_END, FLAG_SYNC,
};
use ferry_multifd::{PacketHeader, SenderOptions, SenderPool, HEADER_LEN, MAX_PACKET_PAGES};
use ferry_ram::pattern::Pattern;
use ferry_ram::{BlockSpec, PageBitmap};
use ferry_transport::{
    await_accept, connect, connect_channel, Channel, ChannelHello, ChannelUri, Role, SessionId,
};

/// A source driven by hand: session open and SETUP acknowledged.
struct RawSource {
    main: Arc<MainChannel>,
    multifd: Vec<ferry_transport::SocketChannel>,
}

fn hello(session: SessionId, role: Role, index: u16, channels: u16) -> ChannelHello {
    ChannelHello {
        session,
        role,
        index,
        multifd_channels: channels,
    }
}

fn raw_source(uri: &ChannelUri, channels: u16, blocks: Vec<BlockSpec>) -> RawSource {
    raw_source_with(uri, channels, blocks, CAP_CHECKSUM)
}

fn raw_source_with(
    uri: &ChannelUri,
    channels: u16,
    blocks: Vec<BlockSpec>,
    capabilities: u8,
) -> RawSource {
    let setup = Setup {
        // Every raw source asks for the switchover to be verified, so the
        // destination answers VERIFY-style (SETUP_ACK below) and compares
        // the digests these tests send.
        capabilities: capabilities | CAP_VERIFY,
        multifd_channels: channels,
        packet_pages: 128,
        blocks,
    };
    let (main, multifd) = raw_session(uri, channels, setup);
    assert_eq!(
        main.recv("destination").unwrap().0,
        Message::SetupAck { verify: true }
    );
    RawSource { main, multifd }
}

impl RawSource {
    /// Sends `messages` on the main channel, in order.
    fn send_main(&self, messages: impl IntoIterator<Item = Message>) {
        for m in messages {
            self.main.send(&m).unwrap();
        }
    }
}

/// Connects a raw source's channels (hellos accepted) and sends `setup`;
/// returns the main channel and the multifd channels.
fn raw_session(
    uri: &ChannelUri,
    channels: u16,
    setup: Setup,
) -> (Arc<MainChannel>, Vec<ferry_transport::SocketChannel>) {
    let session = SessionId::random();
    let tuning = Default::default();
    let main = connect_channel(uri, &tuning, &hello(session, Role::Main, 0, channels)).unwrap();
    let multifd: Vec<_> = (0..channels)
        .map(|i| {
            connect_channel(uri, &tuning, &hello(session, Role::Multifd, i, channels)).unwrap()
        })
        .collect();
    await_accept(&main, Duration::from_secs(5)).unwrap();
    let main = main_channel(main);
    for ch in &multifd {
        await_accept(ch, Duration::from_secs(5)).unwrap();
    }
    main.send(&Message::Setup(setup)).unwrap();
    (main, multifd)
}

/// A raw source's main channel, numbering its frames as a real one does
/// (it sends no heartbeats: each test ends well within the peer timeout).
fn main_channel(ch: ferry_transport::SocketChannel) -> Arc<MainChannel> {
    MainChannel::new(Arc::new(ch), Duration::from_secs(30)).unwrap()
}

/// Header (sealed with its crc), offsets and payload of one packet, as bytes.
fn packet(mut h: PacketHeader, offsets: &[u64], payload: &[u8]) -> Vec<u8> {
    let mut b = [0u8; HEADER_LEN];
    h.seal(&mut b, offsets);
    let mut out = b.to_vec();
    out.extend_from_slice(offsets_as_bytes(offsets));
    out.extend_from_slice(payload);
    out
}

fn data_header(seq: u64, normal: u32, zero: u32) -> PacketHeader {
    PacketHeader {
        flags: FLAG_CHECKSUM,
        normal,
        zero,
        page_size: 4096,
        seq,
        payload_len: u64::from(normal) * 4096,
        generation: 1,
        ..Default::default()
    }
}

fn marker(flag: u16, seq: u64, generation: u64) -> Vec<u8> {
    packet(
        PacketHeader {
            flags: flag | FLAG_CHECKSUM,
            seq,
            generation,
            ..Default::default()
        },
        &[],
        &[],
    )
}

fn crc_of(bytes: &[u8]) -> u32 {
    bytes_crc(bytes)
}

/// A destination writing into `target` (provided memory), on its own thread.
fn destination_into(
    target: &Arc<ferry::GuestMemory>,
) -> (
    std::thread::JoinHandle<Result<ferry::IncomingOutcome, ferry::Failed>>,
    ChannelUri,
) {
    let (l, uri) = listener();
    let opts = IncomingOptions {
        memory: DestinationMemory::Provided(target.clone()),
        ..Default::default()
    };
    (spawn_destination(l, opts), uri)
}

/// The destination's last message (SHUT), past the SWITCHOVER_ACK and
/// RESUMED a live destination sends on the way.
fn final_word(main: &MainChannel) -> Result<Message, ferry::MigrationError> {
    loop {
        match main.recv("destination")?.0 {
            Message::SwitchoverAck | Message::Resumed { .. } => continue,
            other => return Ok(other),
        }
    }
}

/// The destination's error text, which it must also have sent in SHUT.
fn destination_error(
    dst: std::thread::JoinHandle<Result<ferry::IncomingOutcome, ferry::Failed>>,
    main: &MainChannel,
) -> String {
    let err = dst
        .join()
        .unwrap()
        .err()
        .expect("the destination fails")
        .to_string();
    match final_word(main) {
        Ok(Message::Shut { error: Some(e) }) => {
            assert_eq!(e, err, "SHUT carries the destination's error")
        }
        other => panic!("expected SHUT with an error, got {other:?}"),
    }
    err
}

/// The memory every refusal test's destination starts with: one 4 MiB
/// block 'ram' filled with `pattern` (seed 1). Generated the same way each
/// time, so a fresh copy shows what an untouched destination holds.
fn ram_4m(pattern: Pattern) -> Arc<ferry::GuestMemory> {
    memory(&[("ram", 4)], pattern, 1)
}

/// The only packet of pass 1 for [`ram_4m`]: its 1024 pages, all as zero
/// pages.
fn zero_pages_of_ram_4m() -> Vec<u8> {
    let zeros: Vec<u64> = (0..1024).map(|p| p * 4096).collect();
    packet(data_header(0, 0, 1024), &zeros, &[])
}

/// What a destination holding [`ram_4m`]`(pattern)` says when a raw source
/// announcing `capabilities` writes `bytes` on multifd[0]: its error (also
/// checked against its SHUT) and its memory afterwards.
fn refusal(pattern: Pattern, capabilities: u8, bytes: &[u8]) -> (String, Arc<ferry::GuestMemory>) {
    let target = ram_4m(pattern);
    let (dst, uri) = destination_into(&target);
    let src = raw_source_with(&uri, 1, target.specs(), capabilities);
    src.multifd[0].write_all(bytes).unwrap();
    (destination_error(dst, &src.main), target)
}

/// A data header whose `normal` pages are one zstd frame of `frame_len`
/// bytes that decodes to pages with crc `crc`.
fn compressed_header(normal: u32, frame_len: usize, crc: u32) -> PacketHeader {
    let mut h = data_header(0, normal, 0);
    h.flags |= FLAG_COMPRESSED;
    h.compressed_pages = normal;
    h.payload_len = frame_len as u64;
    h.payload_crc = crc;
    h
}

#[test]
fn offset_past_the_block_is_refused_before_any_write() {
    within(30, || {
        let page = vec![0xAAu8; 4096];
        let mut h = data_header(0, 1, 0);
        h.payload_crc = crc_of(&page);
        let (err, target) = refusal(Pattern::Random, CAP_CHECKSUM, &packet(h, &[4 << 20], &page));
        assert!(
            err.contains("multifd[0]") && err.contains("block 'ram'") && err.contains("0x400000"),
            "{err}"
        );
        assert_eq!(
            target.digest(),
            ram_4m(Pattern::Random).digest(),
            "nothing was written"
        );
    });
}

#[test]
fn unaligned_offset_is_refused() {
    within(30, || {
        let page = vec![1u8; 4096];
        let mut h = data_header(0, 1, 0);
        h.payload_crc = crc_of(&page);
        let bytes = packet(h, &[4096 + 17], &page);
        let (err, target) = refusal(Pattern::Random, CAP_CHECKSUM, &bytes);
        assert!(
            err.contains("multifd[0]")
                && err.contains("0x1011")
                && err.contains("not page aligned"),
            "{err}"
        );
        assert_eq!(target.digest(), ram_4m(Pattern::Random).digest());
    });
}

#[test]
fn page_count_past_the_limit_is_refused() {
    within(30, || {
        let mut b = [0u8; HEADER_LEN];
        data_header(0, 0, MAX_PACKET_PAGES + 1).encode(&mut b);
        let (err, _) = refusal(Pattern::Zero, CAP_CHECKSUM, &b);
        assert!(
            err.contains("multifd[0]") && err.contains("packet #0") && err.contains("more than"),
            "{err}"
        );
    });
}

/// A header whose CHECKSUM flag was lost (one flipped bit) would switch off
/// its own checks: the setup announced checksums, so it is refused.
#[test]
fn packet_without_the_announced_checksum_is_refused() {
    within(30, || {
        let page = vec![3u8; 4096];
        let mut h = data_header(0, 1, 0);
        h.flags &= !FLAG_CHECKSUM;
        let (err, target) = refusal(Pattern::Random, CAP_CHECKSUM, &packet(h, &[0], &page));
        assert!(
            err.contains("multifd[0]") && err.contains("no checksum flag"),
            "{err}"
        );
        assert_eq!(target.digest(), ram_4m(Pattern::Random).digest());
    });
}

/// A capability bit this receiver does not know fails setup, naming it,
/// instead of being ignored.
#[test]
fn unknown_capabilities_fail_setup() {
    within(30, || {
        let target = ram_4m(Pattern::Zero);
        let (dst, uri) = destination_into(&target);
        let session = SessionId::random();
        let tuning = Default::default();
        let main = connect_channel(&uri, &tuning, &hello(session, Role::Main, 0, 1)).unwrap();
        let ch = connect_channel(&uri, &tuning, &hello(session, Role::Multifd, 0, 1)).unwrap();
        await_accept(&main, Duration::from_secs(5)).unwrap();
        let main = main_channel(main);
        await_accept(&ch, Duration::from_secs(5)).unwrap();
        let setup = Setup {
            capabilities: CAP_CHECKSUM | 0x40,
            multifd_channels: 1,
            packet_pages: 128,
            blocks: target.specs(),
        };
        main.send(&Message::Setup(setup)).unwrap();
        let err = destination_error(dst, &main);
        assert!(err.contains("bits 0x40"), "{err}");
    });
}

#[test]
fn unknown_block_index_is_refused() {
    within(30, || {
        let mut h = data_header(0, 0, 1);
        h.block = 5;
        let (err, _) = refusal(Pattern::Zero, CAP_CHECKSUM, &packet(h, &[0], &[]));
        assert!(
            err.contains("multifd[0]") && err.contains("block #5") && err.contains("1 block"),
            "{err}"
        );
    });
}

#[test]
fn block_name_unknown_to_the_receiver_fails_setup_on_both_sides() {
    within(30, || {
        let target = memory(&[("pc.ram", 4)], Pattern::Zero, 1);
        let (dst, uri) = destination_into(&target);
        let source_mem = memory(&[("vram", 4)], Pattern::Mixed, 1);
        let failed = migrate_out(
            &image_guest(source_mem),
            &uri,
            &OutgoingOptions::default(),
            &Progress::default(),
        )
        .expect_err("the source fails");
        let dst_err = dst
            .join()
            .unwrap()
            .err()
            .expect("the destination fails")
            .to_string();
        for e in [failed.to_string(), dst_err] {
            assert!(
                e.contains("block 'vram' is unknown to the receiver (it has: pc.ram)"),
                "{e}"
            );
        }
        assert_eq!(failed.summary.status, "failed");
    });
}

#[test]
fn payload_with_a_flipped_byte_fails_at_completion_naming_block_and_offset() {
    within(30, || {
        let target = memory(&[("ram", 4)], Pattern::Zero, 1);
        let (dst, uri) = destination_into(&target);
        let src = raw_source(&uri, 1, target.specs());
        let mut page = vec![7u8; 4096];
        let mut h = data_header(0, 1, 0);
        h.payload_crc = crc_of(&page);
        page[100] ^= 0x10; // flipped in transit
        let ch = &src.multifd[0];
        ch.write_all(&packet(h, &[8192], &page)).unwrap();
        ch.write_all(&marker(FLAG_SYNC, 1, 1)).unwrap();
        ch.write_all(&marker(FLAG_END, 2, 0)).unwrap();
        src.send_main([
            Message::PassEnd { generation: 1 },
            Message::DeviceState(vec![1]),
            Message::Complete { generation: 1 },
        ]);
        let err = destination_error(dst, &src.main);
        assert!(
            err.contains("multifd[0]")
                && err.contains("checksum mismatch in block 'ram' at offset 0x2000"),
            "{err}"
        );
    });
}

/// The main channel's pass numbers must follow the channels: a PASS_END
/// for a pass never sent, a channel that sends END before the pass's SYNC,
/// and a COMPLETE naming an earlier pass each fail at once (they used to
/// leave the destination waiting for ever).
#[test]
fn pass_numbers_out_of_step_with_the_channels_fail_instead_of_hanging() {
    // PASS_END of pass 2 first.
    within(30, || {
        let target = ram_4m(Pattern::Zero);
        let (dst, uri) = destination_into(&target);
        let src = raw_source(&uri, 1, target.specs());
        src.main.send(&Message::PassEnd { generation: 2 }).unwrap();
        let err = destination_error(dst, &src.main);
        assert!(err.contains("PASS_END of pass 2, but pass 1"), "{err}");
    });
    // Channel 1 ends before the sync of pass 1 that channel 0 sent.
    within(30, || {
        let target = ram_4m(Pattern::Zero);
        let (dst, uri) = destination_into(&target);
        let src = raw_source(&uri, 2, target.specs());
        src.multifd[0].write_all(&marker(FLAG_SYNC, 0, 1)).unwrap();
        src.multifd[1].write_all(&marker(FLAG_END, 0, 0)).unwrap();
        src.main.send(&Message::PassEnd { generation: 1 }).unwrap();
        let err = destination_error(dst, &src.main);
        assert!(
            err.contains("ended (END) after the sync of pass 0"),
            "{err}"
        );
    });
    // COMPLETE of pass 0 after pass 1.
    within(30, || {
        let target = ram_4m(Pattern::Zero);
        let (dst, uri) = destination_into(&target);
        let src = raw_source(&uri, 1, target.specs());
        let ch = &src.multifd[0];
        ch.write_all(&zero_pages_of_ram_4m()).unwrap();
        ch.write_all(&marker(FLAG_SYNC, 1, 1)).unwrap();
        src.send_main([
            Message::PassEnd { generation: 1 },
            Message::DeviceState(vec![1]),
            Message::Complete { generation: 0 },
        ]);
        let err = destination_error(dst, &src.main);
        assert!(err.contains("COMPLETE after pass 0"), "{err}");
    });
}

#[test]
fn a_page_twice_in_one_pass_is_refused_before_it_is_written() {
    // Twice in one packet: refused before any payload byte lands.
    within(30, || {
        let pages = [vec![0xAAu8; 4096], vec![0xBBu8; 4096]].concat();
        let mut h = data_header(0, 2, 0);
        h.payload_crc = crc_of(&pages);
        let bytes = packet(h, &[4096, 4096], &pages);
        let (err, target) = refusal(Pattern::Random, CAP_CHECKSUM, &bytes);
        assert!(
            err.contains("multifd[0]")
                && err
                    .contains("page at offset 0x1000 of block 'ram' comes a second time in pass 1"),
            "{err}"
        );
        assert_eq!(
            target.digest(),
            ram_4m(Pattern::Random).digest(),
            "nothing was written"
        );
    });
    // In two packets of one pass, on two channels: whichever comes second
    // is refused (the same page in the next pass is fine: see below).
    within(30, || {
        let target = ram_4m(Pattern::Zero);
        let (dst, uri) = destination_into(&target);
        let src = raw_source(&uri, 2, target.specs());
        for (i, fill) in [0xAAu8, 0xBB].into_iter().enumerate() {
            let page = vec![fill; 4096];
            let mut h = data_header(0, 1, 0);
            h.payload_crc = crc_of(&page);
            src.multifd[i]
                .write_all(&packet(h, &[8 * 4096], &page))
                .unwrap();
        }
        let err = destination_error(dst, &src.main);
        assert!(
            err.contains("page at offset 0x8000 of block 'ram' comes a second time in pass 1"),
            "{err}"
        );
    });
}

/// Also shows that a page may come again in a later pass.
#[test]
fn a_corrupted_page_sent_again_in_a_later_pass_is_forgiven() {
    within(30, || {
        let target = memory(&[("ram", 1)], Pattern::Zero, 1);
        let (dst, uri) = destination_into(&target);
        let src = raw_source(&uri, 1, target.specs());
        let pages = (1 << 20) / 4096;
        let good = vec![9u8; 4096];
        let mut bad = good.clone();
        bad[0] = 0;
        let ch = &src.multifd[0];
        // Pass 1: every page as zero, but page 3 with a payload that fails its check.
        let zeros: Vec<u64> = (0..pages).filter(|&p| p != 3).map(|p| p * 4096).collect();
        ch.write_all(&packet(data_header(0, 0, zeros.len() as u32), &zeros, &[]))
            .unwrap();
        let mut h = data_header(1, 1, 0);
        h.payload_crc = crc_of(&good);
        ch.write_all(&packet(h, &[3 * 4096], &bad)).unwrap();
        ch.write_all(&marker(FLAG_SYNC, 2, 1)).unwrap();
        // Pass 2 sends page 3 again, intact.
        let mut h = data_header(3, 1, 0);
        h.generation = 2;
        h.payload_crc = crc_of(&good);
        ch.write_all(&packet(h, &[3 * 4096], &good)).unwrap();
        ch.write_all(&marker(FLAG_SYNC, 4, 2)).unwrap();
        ch.write_all(&marker(FLAG_END, 5, 0)).unwrap();
        // What the destination must hold: zeros, and page 3 as re-sent.
        let expected = memory(&[("ram", 1)], Pattern::Zero, 1);
        let page3 = expected.blocks()[0].page_addr(3).unwrap();
        // SAFETY: `expected` is this thread's own memory, and page 3 lies
        // inside its 1 MiB block; nothing else reads or writes it.
        unsafe { std::ptr::copy_nonoverlapping(good.as_ptr(), page3, good.len()) };
        src.send_main([
            Message::PassEnd { generation: 1 },
            Message::PassEnd { generation: 2 },
            Message::DeviceState(vec![]),
            Message::Complete { generation: 2 },
            Message::Verify {
                digest: ferry::Digest::of_guest(&expected, &[]).0,
            },
        ]);
        let got = dst
            .join()
            .unwrap()
            .expect("completes: the bad page was re-sent");
        assert_eq!(got.summary.checksum_mismatches, 1);
        assert_eq!(target.blocks()[0].copy_page(3).unwrap(), good);
        assert_eq!(
            final_word(&src.main).unwrap(),
            Message::Shut { error: None }
        );
    });
}

#[test]
fn source_vanishing_mid_payload_is_reported() {
    within(30, || {
        let target = memory(&[("ram", 4)], Pattern::Zero, 1);
        let (dst, uri) = destination_into(&target);
        let src = raw_source(&uri, 2, target.specs());
        let pages = vec![5u8; 8 * 4096];
        let offsets: Vec<u64> = (0..8).map(|p| p * 4096).collect();
        let mut h = data_header(0, 8, 0);
        h.payload_crc = crc_of(&pages);
        let bytes = packet(h, &offsets, &pages);
        src.multifd[1].write_all(&bytes[..bytes.len() / 2]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(src); // the source process dies: every socket closes
        let err = dst
            .join()
            .unwrap()
            .err()
            .expect("the destination fails")
            .to_string();
        assert!(err.contains("connection closed"), "{err}");
        assert!(!err.contains("completed"));
    });
}

#[test]
fn channel_from_another_session_is_refused_and_named() {
    within(30, || {
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let ours = SessionId::random();
        let theirs = SessionId::random();
        let tuning = Default::default();
        let _main = connect_channel(&uri, &tuning, &hello(ours, Role::Main, 0, 2)).unwrap();
        let _m0 = connect_channel(&uri, &tuning, &hello(ours, Role::Multifd, 0, 2)).unwrap();
        let stray = connect_channel(&uri, &tuning, &hello(theirs, Role::Multifd, 1, 2)).unwrap();
        let refused = await_accept(&stray, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("refused") && refused.contains(&theirs.to_string()),
            "{refused}"
        );
        let err = dst
            .join()
            .unwrap()
            .err()
            .expect("the destination fails")
            .to_string();
        assert!(
            err.contains("multifd[1]")
                && err.contains(&theirs.to_string())
                && err.contains(&ours.to_string()),
            "{err}"
        );
    });
}

#[test]
fn non_ferry_clients_at_the_listener_are_named() {
    let cases: [(&str, Vec<u8>); 2] = [
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"
                .to_vec(),
        ),
        (
            "not a ferry channel",
            (0..200u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
    ];
    for (expect, bytes) in cases {
        within(30, move || {
            let (l, uri) = listener();
            let dst = spawn_destination(l, IncomingOptions::default());
            let c = connect(&uri, &Default::default()).unwrap();
            c.write_all(&bytes).unwrap();
            let err = dst
                .join()
                .unwrap()
                .err()
                .expect("the destination fails")
                .to_string();
            assert!(
                err.contains(expect) && err.contains("connection from"),
                "{err}"
            );
        });
    }
}

#[test]
fn silent_client_times_out_instead_of_hanging() {
    within(30, || {
        let (l, uri) = listener();
        let opts = IncomingOptions {
            accept: AcceptOptions {
                hello_timeout: Duration::from_millis(300),
                ..Default::default()
            },
            ..Default::default()
        };
        let dst = spawn_destination(l, opts);
        let c = connect(&uri, &Default::default()).unwrap();
        c.write_all(b"FER").unwrap();
        let err = dst
            .join()
            .unwrap()
            .err()
            .expect("the destination fails")
            .to_string();
        assert!(
            err.contains("timed out") && err.contains("handshake"),
            "{err}"
        );
    });
}

#[test]
fn connection_refused_is_reported_by_the_source() {
    within(30, || {
        let (l, uri) = listener();
        drop(l); // nothing listens there any more
        let mem = memory(&[("ram", 1)], Pattern::Zero, 0);
        let failed = migrate_out(
            &image_guest(mem),
            &uri,
            &OutgoingOptions::default(),
            &Progress::default(),
        )
        .expect_err("fails");
        let e = failed.to_string();
        assert!(
            e.contains("cannot connect to tcp:127.0.0.1") && e.contains("refused"),
            "{e}"
        );
        assert_eq!(failed.summary.status, "failed");
    });
}

#[test]
fn channels_connecting_in_reverse_order_work() {
    within(60, || {
        let mem = memory(&[("ram", 64)], Pattern::Mixed, 21);
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let session = SessionId::random();
        let tuning = Default::default();
        let k = 4u16;
        // multifd[3], [2], [1], [0], and main last.
        let mut multifd: Vec<_> = (0..k)
            .rev()
            .map(|i| connect_channel(&uri, &tuning, &hello(session, Role::Multifd, i, k)).unwrap())
            .collect();
        let main = connect_channel(&uri, &tuning, &hello(session, Role::Main, 0, k)).unwrap();
        for ch in &multifd {
            await_accept(ch, Duration::from_secs(5)).unwrap();
        }
        await_accept(&main, Duration::from_secs(5)).unwrap();
        let main = main_channel(main);
        multifd.reverse();
        let setup = Setup {
            capabilities: CAP_CHECKSUM | CAP_VERIFY,
            multifd_channels: k,
            packet_pages: 128,
            blocks: mem.specs(),
        };
        main.send(&Message::Setup(setup)).unwrap();
        assert_eq!(
            main.recv("destination").unwrap().0,
            Message::SetupAck { verify: true }
        );
        let boxed = multifd
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Channel>)
            .collect();
        let mut pool = SenderPool::start(boxed, mem.clone(), SenderOptions::default()).unwrap();
        let all = Arc::new(
            mem.blocks()
                .iter()
                .map(|b| PageBitmap::new(b.pages(), true))
                .collect::<Vec<_>>(),
        );
        pool.send_pass(all).unwrap();
        for m in [
            Message::PassEnd { generation: 1 },
            Message::DeviceState(b"dev".to_vec()),
            Message::Complete { generation: 1 },
            Message::Verify {
                digest: ferry::Digest::of_guest(&mem, b"dev").0,
            },
        ] {
            main.send(&m).unwrap();
        }
        pool.finish().unwrap();
        assert_eq!(final_word(&main).unwrap(), Message::Shut { error: None });
        let got = dst.join().unwrap().unwrap();
        assert_eq!(got.memory.digest(), mem.digest());
    });
}

/// A zstd frame of `pages` pages of low-entropy bytes, and those bytes.
fn frame_of(pages: usize) -> (Vec<u8>, Vec<u8>) {
    let raw: Vec<u8> = (0..pages * 4096).map(|i| (i % 13) as u8).collect();
    let mut c = ferry_multifd::Compressor::new(1).unwrap();
    let mut frame = Vec::new();
    assert!(c.compress(&[&raw], &mut frame).unwrap());
    (frame, raw)
}

#[test]
fn compressed_payload_of_the_wrong_size_is_refused_inside_its_pages() {
    within(30, || {
        // A frame of 2 pages where the header promises 3 (pages 5, 6, 7).
        let (frame, raw) = frame_of(2);
        let h = compressed_header(3, frame.len(), crc_of(&raw));
        let bytes = packet(h, &[5 * 4096, 6 * 4096, 7 * 4096], &frame);
        let (err, target) = refusal(Pattern::Random, CAP_CHECKSUM | CAP_ZSTD, &bytes);
        assert!(
            err.contains("multifd[0]")
                && err.contains("packet #0")
                && err.contains("block 'ram'")
                && err.contains("decodes to 8192 bytes, but the packet's pages hold 12288"),
            "{err}"
        );
        // Only the packet's own pages may have been written.
        let untouched = ram_4m(Pattern::Random);
        for page in [4, 8] {
            assert_eq!(
                target.blocks()[0].copy_page(page),
                untouched.blocks()[0].copy_page(page)
            );
        }
    });
}

#[test]
fn compressed_payload_that_is_garbage_or_too_long_is_refused() {
    for (pages, garbage) in [(1u32, false), (2, true)] {
        within(30, move || {
            // Too long: a frame of 3 pages (a few hundred bytes) for a
            // 1-page packet. Garbage: bytes that are not zstd at all.
            let (frame, _) = frame_of(3);
            let payload = if garbage { vec![0x5a; 1000] } else { frame };
            let h = compressed_header(pages, payload.len(), 0);
            let offsets: Vec<u64> = (0..u64::from(pages)).map(|p| p * 4096).collect();
            let bytes = packet(h, &offsets, &payload);
            let (err, _) = refusal(Pattern::Random, CAP_CHECKSUM | CAP_ZSTD, &bytes);
            let want = if garbage { "corrupt zstd data" } else { "more" };
            assert!(
                err.contains("multifd[0]") && err.contains("block 'ram'") && err.contains(want),
                "{err}"
            );
        });
    }
}

#[test]
fn compressed_packet_without_compression_in_setup_is_refused() {
    within(30, || {
        let (frame, raw) = frame_of(2);
        let h = compressed_header(2, frame.len(), crc_of(&raw));
        let (err, _) = refusal(
            Pattern::Random,
            CAP_CHECKSUM,
            &packet(h, &[0, 4096], &frame),
        );
        assert!(err.contains("setup announced no compression"), "{err}");
    });
}

/// A destination on its own thread with these options (and fresh memory
/// unless they say otherwise).
fn destination_with(
    opts: IncomingOptions,
) -> (
    std::thread::JoinHandle<Result<ferry::IncomingOutcome, ferry::Failed>>,
    ChannelUri,
) {
    let (l, uri) = listener();
    (spawn_destination(l, opts), uri)
}

fn setup_of(blocks: Vec<BlockSpec>) -> Setup {
    Setup {
        capabilities: CAP_CHECKSUM | CAP_VERIFY,
        multifd_channels: 1,
        packet_pages: 128,
        blocks,
    }
}

/// Files in `dir` other than `keep`.
fn others_in(dir: &std::path::Path, keep: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != keep)
        .map(|p| p.display().to_string())
        .collect()
}

#[test]
fn a_setup_past_the_limits_is_refused_before_anything_is_made() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let ram_out = dir.path().join("guest.ram");
        std::fs::write(&ram_out, b"the user's earlier guest").unwrap();
        let opts = || IncomingOptions {
            memory: DestinationMemory::Files(ram_out.clone()),
            limits: ferry::SetupLimits {
                max_guest_bytes: 64 << 20,
                max_blocks: 8,
            },
            ..Default::default()
        };
        let huge = vec![BlockSpec {
            name: "pc.ram".into(),
            len: 15 << 40,
            page_size: 4096,
        }];
        let many: Vec<BlockSpec> = (0..1000)
            .map(|i| BlockSpec {
                name: format!("b{i}"),
                len: 20 << 30,
                page_size: 4096,
            })
            .collect();
        for (blocks, want) in [
            (
                huge,
                "15.00 TiB of guest RAM in 1 block(s), more than this receiver accepts (64.00 MiB",
            ),
            (
                many,
                "1000 RAM blocks, more than this receiver's limit of 8",
            ),
        ] {
            let (dst, uri) = destination_with(opts());
            let (main, _multifd) = raw_session(&uri, 1, setup_of(blocks));
            let err = destination_error(dst, &main);
            assert!(err.contains(want), "{err}");
            assert_eq!(
                std::fs::read(&ram_out).unwrap(),
                b"the user's earlier guest",
                "the existing --ram-out file is untouched"
            );
            assert_eq!(others_in(dir.path(), &ram_out), Vec::<String>::new());
        }
    });
}

#[test]
fn a_failed_migration_into_files_leaves_the_existing_file_and_nothing_else() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let ram_out = dir.path().join("guest.ram");
        std::fs::write(&ram_out, b"the user's earlier guest").unwrap();
        let (dst, uri) = destination_with(IncomingOptions {
            memory: DestinationMemory::Files(ram_out.clone()),
            ..Default::default()
        });
        let blocks = vec![BlockSpec {
            name: "pc.ram".into(),
            len: 4 << 20,
            page_size: 4096,
        }];
        let (main, multifd) = raw_session(&uri, 1, setup_of(blocks));
        assert_eq!(
            main.recv("destination").unwrap().0,
            Message::SetupAck { verify: true }
        );
        // A valid page, then a packet naming a block that does not exist.
        let page = vec![0x5Au8; 4096];
        let mut h = data_header(0, 1, 0);
        h.payload_crc = crc_of(&page);
        multifd[0].write_all(&packet(h, &[0], &page)).unwrap();
        let mut h = data_header(1, 1, 0);
        h.block = 7;
        h.payload_crc = crc_of(&page);
        multifd[0].write_all(&packet(h, &[0], &page)).unwrap();
        let err = destination_error(dst, &main);
        assert!(err.contains("block #7"), "{err}");
        assert_eq!(
            std::fs::read(&ram_out).unwrap(),
            b"the user's earlier guest"
        );
        assert_eq!(others_in(dir.path(), &ram_out), Vec::<String>::new());
    });
}

#[test]
fn a_digest_that_differs_from_the_sources_fails_before_the_guest_runs() {
    within(60, || {
        let target = ram_4m(Pattern::Zero);
        let (dst, uri) = destination_into(&target);
        let src = raw_source(&uri, 1, target.specs());
        let ch = &src.multifd[0];
        ch.write_all(&zero_pages_of_ram_4m()).unwrap();
        ch.write_all(&marker(FLAG_SYNC, 1, 1)).unwrap();
        ch.write_all(&marker(FLAG_END, 2, 0)).unwrap();
        let right = ferry::Digest::of_guest(&target, b"dev").0;
        src.send_main([
            Message::PassEnd { generation: 1 },
            Message::DeviceState(b"dev".to_vec()),
            Message::Complete { generation: 1 },
            // What a source whose memory differs would say.
            Message::Verify { digest: right ^ 1 },
        ]);
        let err = destination_error(dst, &src.main);
        assert!(
            err.contains("the two sides differ at switchover")
                && err.contains("the destination's guest was not started"),
            "{err}"
        );
    });
}

#[test]
fn a_source_silent_before_setup_fails_the_destination_after_the_peer_timeout() {
    within(60, || {
        let (dst, uri) = destination_with(IncomingOptions {
            peer_timeout: Duration::from_millis(500),
            ..Default::default()
        });
        let session = SessionId::random();
        let tuning = Default::default();
        let main = connect_channel(&uri, &tuning, &hello(session, Role::Main, 0, 1)).unwrap();
        let ch = connect_channel(&uri, &tuning, &hello(session, Role::Multifd, 0, 1)).unwrap();
        await_accept(&main, Duration::from_secs(5)).unwrap();
        let main = main_channel(main);
        await_accept(&ch, Duration::from_secs(5)).unwrap();
        // ... and then nothing: no SETUP, no FIN.
        let err = dst.join().unwrap().err().unwrap().to_string();
        assert!(
            err.contains("main channel: nothing from the source for 0.5 s (--peer-timeout)"),
            "{err}"
        );
        drop((main, ch));
    });
}

#[test]
fn a_channel_that_stalls_mid_pass_is_named_while_main_stays_alive() {
    within(60, || {
        let target = ram_4m(Pattern::Zero);
        let (l, uri) = listener();
        let dst = spawn_destination(
            l,
            IncomingOptions {
                memory: DestinationMemory::Provided(target.clone()),
                peer_timeout: Duration::from_millis(800),
                ..Default::default()
            },
        );
        let src = raw_source(&uri, 2, target.specs());
        // multifd[0] delivers its share and its SYNC; multifd[1] stays
        // silent (no FIN), while main keeps beating.
        src.multifd[0].write_all(&zero_pages_of_ram_4m()).unwrap();
        src.multifd[0].write_all(&marker(FLAG_SYNC, 1, 1)).unwrap();
        src.main.send(&Message::PassEnd { generation: 1 }).unwrap();
        src.main
            .start_heartbeat(Duration::from_millis(100))
            .unwrap();
        let err = destination_error(dst, &src.main);
        src.main.stop_heartbeat();
        assert!(
            err.contains("multifd[1]") && err.contains("no progress for 0.8 s (--peer-timeout)"),
            "{err}"
        );
    });
}
