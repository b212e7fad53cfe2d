use std::time::Instant;
fn distinct(p: &[u8]) -> u32 {
    let mut seen = [0u64; 4];
    for i in (0..p.len()).step_by(64) {
        let b = p[i];
        seen[(b >> 6) as usize] |= 1 << (b & 63);
    }
    seen.iter().map(|w| w.count_ones()).sum()
}
fn main() {
    let data = std::fs::read("/dev/shm/tlsx256.ram").unwrap();
    let pages: Vec<&[u8]> = data
        .chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .collect();
    let (lo, hi): (Vec<&[u8]>, Vec<&[u8]>) = pages.iter().partition(|p| distinct(p) <= 40);
    println!("low {} high {}", lo.len(), hi.len());
    for (name, set) in [("low", &lo), ("high", &hi)] {
        for level in [1, -1, -5] {
            let mut c = ferry_multifd::Compressor::new(level).unwrap();
            let t = Instant::now();
            let (mut raw, mut wire) = (0usize, 0usize);
            for pkt in set.chunks(96) {
                let n: usize = pkt.iter().map(|p| p.len()).sum();
                raw += n;
                wire += match c.compress(pkt, 1 << 30).unwrap() {
                    Some(f) => f.len(),
                    None => n,
                };
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{name} level {level:>2}: {:.0} MB/s, ratio {:.3}",
                raw as f64 / s / 1e6,
                raw as f64 / wire as f64
            );
        }
    }
    let t = Instant::now();
    let n: u32 = pages.iter().map(|p| distinct(p)).sum();
    println!(
        "classify: {:.0} MB/s ({n})",
        (pages.len() * 4096) as f64 / t.elapsed().as_secs_f64() / 1e6
    );
}
