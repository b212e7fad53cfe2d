//! Assembles the guest program (`guest/guest.S`) with binutils `as` and
//! links it with `ld` and `guest/guest.ld` into a PVH ELF in OUT_DIR
//! (`guest.elf`): the file ferry's VMM loads and `qemu-system-x86_64
//! -kernel` boots. The layout constants come from `src/layout.rs` (passed
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
    let (src, script) = ("guest/guest.S", "guest/guest.ld");
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rerun-if-changed=src/layout.rs");
    let obj = out.join("guest.o");
    let elf = out.join("guest.elf");
    let mut as_cmd = Command::new(std::env::var("AS").unwrap_or_else(|_| "as".into()));
    as_cmd.arg("--64").arg("-o").arg(&obj);
    for (name, value) in layout::ASM_SYMBOLS {
        as_cmd.arg("--defsym").arg(format!("{name}={value:#x}"));
    }
    as_cmd.arg(src);
    run(&mut as_cmd, "the assembler");
    run(
        Command::new(std::env::var("LD").unwrap_or_else(|_| "ld".into()))
            .args(["-nostdlib", "--build-id=none", "-z", "max-page-size=4096"])
            .arg("--defsym")
            .arg(format!("CODE={:#x}", layout::CODE))
            .arg("-T")
            .arg(script)
            .arg("-o")
            .arg(&elf)
            .arg(&obj),
        "the linker",
    );
    // The VMM checks the segments against the layout when it loads the
    // file (pvh.rs); here only that there is one.
    let len = std::fs::metadata(&elf).expect("ld wrote the ELF").len();
    assert!(len > 0, "the guest ELF is empty");
}
