//! Compiles `src/probes.bpf.c` with Debian's clang into `$OUT_DIR/probes.bpf.o` (which
//! `src/lib.rs` embeds), and measures the shared structs as C lays them out, so a test
//! can hold the Rust mirrors to them.

use std::path::{Path, PathBuf};
use std::process::Command;

const STRUCTS: &[&str] = &[
    "ferry_watch",
    "ferry_vm_counts",
    "ferry_exit_key",
    "ferry_io_start",
    "ferry_io_stats",
    "ferry_rq_key",
    "ferry_rq_start",
    "ferry_block_key",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang-19".into());
    for f in ["src/probes.bpf.c", "src/ferry.h", "include/vmlinux.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=BPF_CLANG");

    let include = manifest.join("include");
    let src = manifest.join("src");
    run(
        Command::new(&clang)
            .args(["-target", "bpf", "-D__TARGET_ARCH_x86", "-O2", "-g"])
            .args(["-Wall", "-Werror"])
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(src.join("probes.bpf.c"))
            .arg("-o")
            .arg(out.join("probes.bpf.o")),
        &clang,
    );

    // The same header compiled for this host: its struct sizes, as Rust constants.
    let sizes_c = out.join("sizes.c");
    let mut c = String::from(
        "#include <stdio.h>\ntypedef unsigned int __u32;\ntypedef unsigned long long __u64;\n\
         #include \"ferry.h\"\nint main(void) {\n",
    );
    for s in STRUCTS {
        c += &format!(
            "printf(\"pub const {}: usize = %zu;\\n\", sizeof(struct {s}));\n",
            s.to_uppercase()
        );
    }
    c += "return 0;\n}\n";
    write(&sizes_c, &c);
    let sizes = out.join("sizes");
    run(
        Command::new(&clang)
            .arg("-I")
            .arg(&src)
            .arg(&sizes_c)
            .arg("-o")
            .arg(&sizes),
        &clang,
    );
    let printed = Command::new(&sizes)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", sizes.display()));
    write(
        &out.join("c_sizes.rs"),
        &String::from_utf8_lossy(&printed.stdout),
    );
}

fn run(cmd: &mut Command, clang: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed ({s}): {cmd:?}"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{clang}` was not found. Ferry's eBPF programs are C, built by clang: run \
             `cargo xtask setup` (or `apt-get install clang-19 libbpf-dev bpftool`), or set \
             BPF_CLANG to another clang (12 or newer)."
        ),
        Err(e) => panic!("running {clang}: {e}"),
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
