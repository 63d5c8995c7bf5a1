//! `AlignedBuf`: the CPU backend's activation and KV-cache buffers, f32s that start on a
//! cache-line boundary. The SIMD kernels read them a 64-byte vector at a time; from a
//! 16-byte aligned `Vec` every such load straddled two cache lines, which cost batched
//! decode's kernel 2-6% at four inputs and 23-39% at eight (one core, alternating in one
//! process).

use std::ops::{Deref, DerefMut};

/// One cache line of f32s.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `len` f32s, zeroed at first, starting on a 64-byte boundary; used as a slice.
#[derive(Clone)]
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf {
            lines: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }
}

impl From<&[f32]> for AlignedBuf {
    fn from(v: &[f32]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(v.len());
        b.copy_from_slice(v);
        b
    }
}

impl Deref for AlignedBuf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` initialized f32s, contiguous (`Line` is
        // `repr(C)` of f32s with no padding: 64 bytes, 64-aligned).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    #[test]
    fn starts_on_a_cache_line_and_holds_exactly_len_values() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let v: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let mut b = AlignedBuf::from(&v[..]);
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert_eq!(&b[..], &v[..]);
            b.iter_mut().for_each(|x| *x += 1.0);
            assert!(b.iter().zip(&v).all(|(b, v)| *b == v + 1.0));
            assert!(AlignedBuf::zeroed(len).iter().all(|&x| x == 0.0));
        }
    }
}
