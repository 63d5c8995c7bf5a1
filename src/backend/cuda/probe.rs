//! Finding a usable CUDA device without panicking: cudarc panics when a CUDA library cannot
//! be loaded, so the driver, NVRTC and cuBLAS libraries are looked for here first (with the
//! names cudarc would try) and their absence becomes an error value that says which is missing.

/// Why CUDA cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
    /// A shared library is missing.
    #[error("CUDA library '{0}' not found (tried {1}); is the NVIDIA driver / CUDA toolkit installed and on LD_LIBRARY_PATH?")]
    MissingLibrary(&'static str, String),
    /// The driver loaded but reports no device (or not the one asked for).
    #[error("no CUDA device {0} (the driver reports {1})")]
    NoDevice(usize, usize),
    /// The driver failed.
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// A kernel failed to compile or load.
    #[error("CUDA kernels: {0}")]
    Kernels(String),
}

/// Whether one of cudarc's candidate names for `lib` can be loaded.
fn can_load(lib: &'static str) -> Result<(), CudaUnavailable> {
    let names = cudarc::get_lib_name_candidates(lib);
    for n in &names {
        // SAFETY: loading a CUDA library runs its initialisers, which is what cudarc would do.
        if unsafe { libloading::Library::new(n) }.is_ok() {
            return Ok(());
        }
    }
    let tried = format!(
        "{} and {} other names",
        names.last().map_or("", String::as_str),
        names.len().saturating_sub(1)
    );
    Err(CudaUnavailable::MissingLibrary(lib, tried))
}

/// Whether NVRTC alone is loadable (kernels can be compiled, even without a device).
pub fn nvrtc_available() -> bool {
    can_load("nvrtc").is_ok()
}

/// Checks the libraries and that device `ordinal` exists.
pub fn probe(ordinal: usize) -> Result<(), CudaUnavailable> {
    can_load("cuda")?;
    can_load("nvrtc")?;
    can_load("cublas")?;
    let n = cudarc::driver::CudaContext::device_count()
        .map_err(|e| CudaUnavailable::Driver(e.to_string()))?;
    let n = n.max(0) as usize;
    if ordinal >= n {
        return Err(CudaUnavailable::NoDevice(ordinal, n));
    }
    Ok(())
}
