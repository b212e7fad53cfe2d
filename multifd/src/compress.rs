//! zstd per packet: one reusable compression context per sender thread and
//! one decompression context per receiver thread.
//!
//! A packet's payload (its normal pages, as runs of guest memory) becomes one
//! zstd frame written into the sender's own buffer; if the frame would not be
//! smaller than the pages it goes raw. The receiver decodes the frame
//! straight into the destination page runs, and a frame that decodes to
//! more or fewer bytes than the packet's pages, or does not decode at all, is
//! an error (the caller names channel, packet and block).

use std::io;

use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// A sender thread's compression context.
pub struct Compressor {
    enc: Encoder<'static>,
}

impl Compressor {
    pub fn new(level: i32) -> io::Result<Self> {
        Ok(Self {
            enc: Encoder::new(level)?,
        })
    }

    /// Compresses the runs (in order) into one frame in `out` (replacing
    /// what it held). False, with `out` holding nothing of use, if the frame
    /// would not be smaller than the runs together. (Ending a zstd block at
    /// every page was measured: 10% slower, the same ratio.)
    pub fn compress(&mut self, runs: &[&[u8]], out: &mut Vec<u8>) -> io::Result<bool> {
        let limit: usize = runs.iter().map(|r| r.len()).sum();
        if limit == 0 {
            return Ok(false);
        }
        // zstd writes into the vector's spare capacity and sets its length.
        out.clear();
        out.reserve(limit);
        self.enc.reinit()?;
        self.enc.set_pledged_src_size(Some(limit as u64))?;
        let mut ob = OutBuffer::around(out);
        for run in runs {
            let mut ib = InBuffer::around(run);
            while ib.pos() < run.len() {
                self.enc.run(&mut ib, &mut ob)?;
                if ob.pos() >= limit {
                    return Ok(false);
                }
            }
        }
        loop {
            let left = self.enc.finish(&mut ob, true)?;
            if left == 0 {
                break;
            }
            if ob.pos() >= limit {
                return Ok(false);
            }
        }
        let n = ob.pos();
        Ok(n < limit)
    }
}

/// A receiver thread's decompression context, decoding one frame at a time
/// into a list of destination runs.
pub struct Decompressor {
    dec: Decoder<'static>,
    run: usize,
    at: usize,
    hint: usize,
}

impl Decompressor {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            dec: Decoder::new()?,
            run: 0,
            at: 0,
            hint: 1,
        })
    }

    /// Starts a new frame.
    pub fn begin(&mut self) -> io::Result<()> {
        self.dec.reinit()?;
        (self.run, self.at, self.hint) = (0, 0, 1);
        Ok(())
    }

    /// Decodes `input` (the next bytes of the frame) into `runs`, after
    /// what earlier calls wrote. Writes only inside `runs`.
    pub fn feed(&mut self, input: &[u8], runs: &mut [&mut [u8]]) -> Result<(), String> {
        let mut ib = InBuffer::around(input);
        while ib.pos() < input.len() {
            if self.run == runs.len() {
                return Err("decodes to more bytes than the packet's pages".into());
            }
            let dst = &mut runs[self.run][self.at..];
            let mut ob = OutBuffer::around(dst);
            self.hint = self
                .dec
                .run(&mut ib, &mut ob)
                .map_err(|e| format!("corrupt zstd data: {e}"))?;
            self.advance(ob.pos(), runs);
            if self.hint == 0 && ib.pos() < input.len() {
                return Err(format!(
                    "{} stray bytes after the zstd frame",
                    input.len() - ib.pos()
                ));
            }
        }
        Ok(())
    }

    fn advance(&mut self, n: usize, runs: &[&mut [u8]]) {
        self.at += n;
        while self.run < runs.len() && self.at == runs[self.run].len() {
            self.run += 1;
            self.at = 0;
        }
    }

    /// After the whole frame was fed: flushes what the decoder holds and
    /// checks that it filled `runs` exactly.
    pub fn end(&mut self, runs: &mut [&mut [u8]]) -> Result<(), String> {
        let want: usize = runs.iter().map(|r| r.len()).sum();
        while self.run < runs.len() {
            let dst = &mut runs[self.run][self.at..];
            let mut ob = OutBuffer::around(dst);
            self.hint = self
                .dec
                .run(&mut InBuffer::around(&[]), &mut ob)
                .map_err(|e| format!("corrupt zstd data: {e}"))?;
            if ob.pos() == 0 {
                break;
            }
            self.advance(ob.pos(), runs);
        }
        let got: usize = runs[..self.run].iter().map(|r| r.len()).sum::<usize>() + self.at;
        if got < want {
            return Err(format!(
                "decodes to {got} bytes, but the packet's pages hold {want}"
            ));
        }
        if self.hint != 0 {
            let mut extra = [0u8; 1];
            let mut ob = OutBuffer::around(&mut extra[..]);
            let _ = self.dec.run(&mut InBuffer::around(&[]), &mut ob);
            if ob.pos() > 0 {
                return Err(format!(
                    "decodes to more than the {want} bytes of the packet's pages"
                ));
            }
            return Err("the zstd frame is truncated".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_over_runs_and_wrong_sizes_refused() {
        let a: Vec<u8> = (0..8192u32).map(|i| (i % 7) as u8).collect();
        let b = vec![3u8; 4096];
        let mut c = Compressor::new(1).unwrap();
        let mut frame = Vec::new();
        assert!(c.compress(&[&a, &b], &mut frame).unwrap());
        assert!(frame.len() < a.len() + b.len());
        let mut d = Decompressor::new().unwrap();
        let (mut x, mut y) = (vec![0u8; 8192], vec![0u8; 4096]);
        d.begin().unwrap();
        for part in frame.chunks(100) {
            d.feed(part, &mut [&mut x, &mut y]).unwrap();
        }
        d.end(&mut [&mut x, &mut y]).unwrap();
        assert_eq!((x.as_slice(), y.as_slice()), (a.as_slice(), b.as_slice()));

        // Fewer pages than the frame holds, and more.
        let mut short = vec![0u8; 8192];
        d.begin().unwrap();
        let e = d
            .feed(&frame, &mut [&mut short])
            .and_then(|()| d.end(&mut [&mut short]))
            .unwrap_err();
        assert!(e.contains("more"), "{e}");
        let mut long = vec![0u8; 16384];
        d.begin().unwrap();
        d.feed(&frame, &mut [&mut long]).unwrap();
        let e = d.end(&mut [&mut long]).unwrap_err();
        assert!(e.contains("decodes to 12288 bytes"), "{e}");
        // Garbage.
        d.begin().unwrap();
        let e = d
            .feed(&[1, 2, 3, 4, 5, 6, 7, 8], &mut [&mut long])
            .unwrap_err();
        assert!(e.contains("corrupt"), "{e}");
    }

    #[test]
    fn incompressible_goes_raw() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let r: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut out = vec![7u8; 10];
        assert!(!Compressor::new(1)
            .unwrap()
            .compress(&[&r], &mut out)
            .unwrap());
    }
}
