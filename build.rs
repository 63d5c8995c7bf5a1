//! Build script: embeds every `kernels/*.cu` source (and `kernels/common.cuh`, which is
//! prepended to each) into the binary, so the CUDA backend can compile them with NVRTC at
//! start-up for the device's own compute capability. When `nvcc` is on the PATH it also
//! compiles each file to PTX (`-arch=compute_$CUDA_COMPUTE_CAP`, default 90, a PTX that Hopper
//! and newer JIT-compile) and embeds that, so start-up skips NVRTC.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut files: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let common = std::fs::canonicalize("kernels/common.cuh").ok();
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = Command::new("nvcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());

    let mut table = String::new();
    let common_src = match &common {
        Some(p) => format!("include_str!({:?})", p.display().to_string()),
        None => "\"\"".into(),
    };
    writeln!(table, "/// Device helpers prepended to every kernel source.\npub const KERNEL_COMMON: &str = {common_src};").unwrap();
    table.push_str("/// Embedded CUDA kernel sources: (file stem, source).\npub const KERNEL_SOURCES: &[(&str, &str)] = &[\n");
    let mut ptx_table = String::from("/// PTX built by nvcc at build time: (file stem, ptx); empty without nvcc.\npub const KERNEL_PTX: &[(&str, &str)] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let abs = std::fs::canonicalize(f).expect("kernel path");
        writeln!(
            table,
            "    ({stem:?}, include_str!({:?})),",
            abs.display().to_string()
        )
        .unwrap();
        if nvcc {
            if let Some(ptx) = nvcc_ptx(
                &abs,
                common.as_deref(),
                &cap,
                &out_dir.join(format!("{stem}.ptx")),
            ) {
                writeln!(
                    ptx_table,
                    "    ({stem:?}, include_str!({:?})),",
                    ptx.display().to_string()
                )
                .unwrap();
            }
        }
    }
    table.push_str("];\n");
    ptx_table.push_str("];\n");
    table.push_str(&ptx_table);
    std::fs::write(out_dir.join("kernels.rs"), table).expect("writing kernels.rs");
}

fn nvcc_ptx(src: &Path, common: Option<&Path>, cap: &str, out: &Path) -> Option<PathBuf> {
    let mut cmd = Command::new("nvcc");
    cmd.args(["--ptx", &format!("-arch=compute_{cap}"), "-O3", "-o"])
        .arg(out);
    if let Some(c) = common {
        cmd.arg("-include").arg(c);
    }
    match cmd.arg(src).output() {
        Ok(o) if o.status.success() => Some(out.to_path_buf()),
        Ok(o) => {
            println!(
                "cargo:warning=nvcc failed on {}: {}",
                src.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(_) => None,
    }
}
