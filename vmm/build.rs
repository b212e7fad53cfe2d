//! Assembles the guest program (`guest/guest.S`) with binutils `as` and
//! `objcopy` into a flat binary in OUT_DIR, loaded by the VMM at
//! `layout::CODE`. The layout constants come from `src/layout.rs` (passed
//! as `--defsym`), so the program and the VMM share one definition.

use std::path::PathBuf;
use std::process::Command;

#[allow(dead_code)]
#[path = "src/layout.rs"]
mod layout;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {what} ({cmd:?}): {e}; binutils is needed to build the guest program")
    });
    assert!(status.success(), "{what} failed: {cmd:?}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = "guest/guest.S";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=src/layout.rs");
    let obj = out.join("guest.o");
    let bin = out.join("guest.bin");
    let mut as_cmd = Command::new(std::env::var("AS").unwrap_or_else(|_| "as".into()));
    as_cmd.arg("--64").arg("-o").arg(&obj);
    for (name, value) in layout::ASM_SYMBOLS {
        as_cmd.arg("--defsym").arg(format!("{name}={value:#x}"));
    }
    as_cmd.arg(src);
    run(&mut as_cmd, "the assembler");
    run(
        Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin),
        "objcopy",
    );
    let len = std::fs::metadata(&bin)
        .expect("objcopy wrote the binary")
        .len();
    assert!(
        len > 0 && len <= layout::CODE_MAX,
        "the guest program is {len} bytes; it must fit in {} bytes",
        layout::CODE_MAX
    );
}
