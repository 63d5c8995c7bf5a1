//! Build script: embeds every `kernels/*.cu` source into the binary (`OUT_DIR/kernels.rs`,
//! a `KERNEL_SOURCES: &[(&str, &str)]` table of file stem and source) so a CUDA backend can
//! compile them with NVRTC at start-up for the device's own compute capability.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut table = String::from("/// Embedded CUDA kernel sources: (file stem, source).\npub const KERNEL_SOURCES: &[(&str, &str)] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let stem = f.file_stem().unwrap().to_string_lossy();
        let abs = std::fs::canonicalize(f).expect("kernel path");
        writeln!(
            table,
            "    ({stem:?}, include_str!({:?})),",
            abs.display().to_string()
        )
        .unwrap();
    }
    table.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernels.rs");
    std::fs::write(out, table).expect("writing kernels.rs");
}
