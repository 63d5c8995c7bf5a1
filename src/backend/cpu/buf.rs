//! `AlignedBuf`: the CPU backend's activation and KV-cache buffers, f32s (or, for an f16 KV
//! cache, IEEE halves) that start on a cache-line boundary. The SIMD kernels read them a
//! 64-byte vector at a time; from a 16-byte aligned `Vec` every such load straddled two cache
//! lines, which cost batched decode's kernel 2-6% at four inputs and 23-39% at eight (one
//! core, alternating in one process).

use std::ops::{Deref, DerefMut};

/// One cache line of f32s.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `len` f32s, zeroed at first, starting on a 64-byte boundary; used as a slice. A buffer of
/// halves (`halves`) holds `len` f16 bit patterns instead, read through `as_halves`; as an
/// f32 slice it is empty, so an op that takes it for f32s finds nothing to read.
#[derive(Clone)]
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
    half: bool,
}

impl AlignedBuf {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf {
            lines: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
            half: false,
        }
    }

    /// `len` f16 zeros.
    pub fn halves(len: usize) -> AlignedBuf {
        AlignedBuf {
            lines: vec![Line([0.0; 16]); len.div_ceil(32)],
            len,
            half: true,
        }
    }

    /// The f16 bit patterns of a buffer of halves.
    pub fn as_halves(&self) -> Option<&[u16]> {
        // SAFETY: a buffer of halves holds `len` u16s in its lines (32 to a line), any bits
        // valid, aligned for u16.
        self.half
            .then(|| unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) })
    }

    /// As `as_halves`, to write.
    pub fn as_halves_mut(&mut self) -> Option<&mut [u16]> {
        // SAFETY: as in `as_halves`, borrowed mutably through `self`.
        self.half.then(|| unsafe {
            std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len)
        })
    }

    /// f32s the buffer holds (none when it holds halves).
    fn f32s(&self) -> usize {
        if self.half {
            0
        } else {
            self.len
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
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.f32s()) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        let n = self.f32s();
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), n) }
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
            let mut h = AlignedBuf::halves(len);
            assert_eq!(h.as_halves().unwrap().as_ptr() as usize % 64, 0);
            assert!(h.is_empty() && b.as_halves().is_none());
            h.as_halves_mut().unwrap().fill(0x3c00);
            assert_eq!(h.as_halves().unwrap(), vec![0x3c00; len]);
        }
    }
}
