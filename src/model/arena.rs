//! `HugeBuf<T>`: the weights' values (compact matrices' blocks, scales and minimums, and
//! f32 tensors), side by side in large anonymous mappings that Linux is asked to back with
//! 2 MB pages (`MADV_HUGEPAGE`; the machine's default is often "only when asked"). A decode
//! step reads every weight once, in hundreds of matrices most of which are smaller than a
//! 2 MB page: with 4 KB pages each page needed a TLB entry of its own. Each matrix alone
//! could not fill a huge page, so they share chunks. SmolLM2's decode steps took 0.94 of the
//! time at one sequence (medians of two runs of 6 and 4 rounds alternating binaries, 2
//! cores; the default model got 122 of its 168 MB in huge pages), and 1.02 (within the
//! noise) at four, where the kernels compute more than they wait. Where the kernel gives no
//! huge pages, these are ordinary pages and nothing else changes.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;

/// Values that any bytes of their size are a valid value of, with no padding.
pub trait Plain: Copy + Send + Sync + 'static {}
impl Plain for u8 {}
impl Plain for f32 {}

/// A huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Bytes of one shared chunk; a larger buffer gets a chunk of its own.
const CHUNK: usize = 16 * HUGE_PAGE;

/// One anonymous mapping, its usable part starting on a huge-page boundary.
struct Chunk {
    _map: MmapMut,
    base: *mut u8,
    len: usize,
}

// SAFETY: `base` points into `_map`, which lives as long as the chunk. Bytes are written
// once, through `HugeBuf::filled`, before any `HugeBuf` for them exists; after that they are
// only read.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    /// A chunk of at least `len` bytes. Failing to map memory is failing to allocate it,
    /// and ends the process as a failed allocation does.
    fn new(len: usize) -> Chunk {
        let len = len.next_multiple_of(HUGE_PAGE);
        let map = MmapMut::map_anon(len + HUGE_PAGE)
            .unwrap_or_else(|e| panic!("mapping {len} bytes for weights: {e}"));
        let skip = map.as_ptr().align_offset(HUGE_PAGE);
        #[cfg(target_os = "linux")]
        {
            // only a request: a kernel without transparent huge pages refuses it
            let _ = map.advise_range(memmap2::Advice::HugePage, skip, len);
        }
        // SAFETY: `skip < HUGE_PAGE`, so `skip..skip + len` lies inside the mapping.
        let base = unsafe { map.as_ptr().add(skip) as *mut u8 };
        Chunk {
            _map: map,
            base,
            len,
        }
    }
}

/// The chunk being filled and how many of its bytes are taken.
static OPEN: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

/// `len` bytes at a 64-byte boundary: in the open chunk when they fit, else in a new one.
fn reserve(len: usize) -> (Arc<Chunk>, usize) {
    if len > CHUNK / 4 {
        return (Arc::new(Chunk::new(len)), 0);
    }
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((chunk, used)) = open.as_mut() {
        let at = used.next_multiple_of(64);
        if at + len <= chunk.len {
            *used = at + len;
            return (Arc::clone(chunk), at);
        }
    }
    let chunk = Arc::new(Chunk::new(CHUNK));
    *open = Some((Arc::clone(&chunk), len));
    (chunk, 0)
}

/// Read-only values in a shared chunk (see the module), used as a slice; cloning shares
/// them. A chunk's memory is unmapped when its last buffer and the loader are done with it.
pub struct HugeBuf<T: Plain> {
    /// The chunk and the byte offset of the values; `None` when empty.
    place: Option<(Arc<Chunk>, usize)>,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Plain> From<&[T]> for HugeBuf<T> {
    /// A copy of `v`.
    fn from(v: &[T]) -> HugeBuf<T> {
        HugeBuf::filled(v.len(), |dst| dst.copy_from_slice(v))
    }
}

impl<T: Plain> From<Vec<T>> for HugeBuf<T> {
    fn from(v: Vec<T>) -> HugeBuf<T> {
        HugeBuf::from(&v[..])
    }
}

impl<T: Plain> FromIterator<T> for HugeBuf<T> {
    fn from_iter<I: IntoIterator<Item = T>>(values: I) -> HugeBuf<T> {
        HugeBuf::from(values.into_iter().collect::<Vec<T>>())
    }
}

impl<T: Plain> HugeBuf<T> {
    /// No values.
    pub fn empty() -> HugeBuf<T> {
        HugeBuf {
            place: None,
            len: 0,
            _values: PhantomData,
        }
    }

    /// `len` values written in place by `fill` (which finds them zero), read-only after: no
    /// copy, and no second buffer.
    pub fn filled(len: usize, fill: impl FnOnce(&mut [T])) -> HugeBuf<T> {
        let bytes = len * std::mem::size_of::<T>();
        if bytes == 0 {
            return HugeBuf::empty();
        }
        let (chunk, at) = reserve(bytes);
        // SAFETY: `at..at + bytes` was reserved for this buffer alone, inside the chunk, at a
        // 64-byte boundary (enough for T's alignment); a new mapping reads as zeros, which
        // any `Plain` type takes; nothing else sees it until `fill` returns.
        let values = unsafe { std::slice::from_raw_parts_mut(chunk.base.add(at) as *mut T, len) };
        fill(values);
        HugeBuf {
            place: Some((chunk, at)),
            len,
            _values: PhantomData,
        }
    }
}

impl<T: Plain> Deref for HugeBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.place {
            // SAFETY: `len` values of T were copied there by `from` and are never written
            // again; the chunk lives as long as `self` holds it.
            Some((chunk, at)) => unsafe {
                std::slice::from_raw_parts(chunk.base.add(*at) as *const T, self.len)
            },
            None => &[],
        }
    }
}

impl<T: Plain> Clone for HugeBuf<T> {
    fn clone(&self) -> HugeBuf<T> {
        HugeBuf {
            place: self.place.clone(),
            len: self.len,
            _values: PhantomData,
        }
    }
}

impl<T: Plain + PartialEq> PartialEq for HugeBuf<T> {
    fn eq(&self, other: &HugeBuf<T>) -> bool {
        self[..] == other[..]
    }
}

impl<T: Plain> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf({} values)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::{HugeBuf, CHUNK};

    #[test]
    fn buffers_hold_their_values_apart_and_aligned() {
        // small ones share the open chunk, the large one gets its own
        let sizes = [1usize, 3, 1000, 64, CHUNK / 4 + 1, 17, 0];
        let made: Vec<(Vec<f32>, HugeBuf<f32>)> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let v: Vec<f32> = (0..n).map(|i| (i * 7 + k) as f32).collect();
                let b = HugeBuf::from(&v[..]);
                (v, b)
            })
            .collect();
        for (v, b) in &made {
            assert_eq!(&b[..], &v[..]);
            assert!(v.is_empty() || (b.as_ptr() as usize).is_multiple_of(64));
            assert_eq!(b.clone(), *b);
        }
        let bytes: HugeBuf<u8> = (0..=255u8).collect();
        assert!(bytes.iter().enumerate().all(|(i, &b)| b as usize == i));
        assert!(HugeBuf::<u8>::empty().is_empty());
    }

    #[test]
    fn filled_buffers_start_at_zero_and_keep_what_was_written() {
        for n in [0usize, 5, CHUNK / 4 + 3] {
            let b = HugeBuf::<f32>::filled(n, |v| {
                assert!(v.iter().all(|&x| x == 0.0));
                v.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = i as f32 - 2.0);
            });
            assert_eq!(b.len(), n);
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as f32 - 2.0));
        }
    }
}
