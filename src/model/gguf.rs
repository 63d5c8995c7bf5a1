//! The GGUF container: header, metadata key/values and tensor directory, parsed from a
//! memory-mapped file with every length and offset bounds-checked (a truncated or corrupt
//! file is an error, never a panic). Turning tensor bytes into numbers is `dequant.rs`'s job;
//! mapping GGUF names to Hugging Face names is `weights.rs`'s.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::GgmlType;
use super::error::LoadError;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any integer type, widened.
    Int(i64),
    /// f32 or f64, widened.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (invalid bytes replaced).
    Str(String),
    /// An array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(f) => Some(*f),
            MetaValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Shape in Hugging Face order (outermost first; GGUF stores innermost first).
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlType,
    /// The raw type id as stored (for error messages about unsupported types).
    pub raw_type: u32,
    /// Byte range of the tensor's data in the file.
    pub start: usize,
    /// Byte length (0 when the type is unsupported).
    pub len: usize,
}

/// A parsed GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Metadata by key.
    pub meta: HashMap<String, MetaValue>,
    /// Tensor directory by GGUF tensor name.
    pub tensors: HashMap<String, TensorInfo>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, String>;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!("truncated at byte {} (wanted {n} more)", self.pos)),
        }
    }
    fn arr<const N: usize>(&mut self) -> R<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A count that must fit in what is left of the file at `min_size` bytes per item.
    fn count(&mut self, min_size: usize) -> R<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_size.max(1) as u64) > left {
            return Err(format!(
                "count {n} at byte {} exceeds the file",
                self.pos - 8
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> R<String> {
        let n = self.count(1)?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> R<MetaValue> {
        Ok(match ty {
            0 => MetaValue::Int(self.arr::<1>()?[0] as i64),
            1 => MetaValue::Int(self.arr::<1>()?[0] as i8 as i64),
            2 => MetaValue::Int(u16::from_le_bytes(self.arr()?) as i64),
            3 => MetaValue::Int(i16::from_le_bytes(self.arr()?) as i64),
            4 => MetaValue::Int(self.u32()? as i64),
            5 => MetaValue::Int(i32::from_le_bytes(self.arr()?) as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.arr()?) as f64),
            7 => MetaValue::Bool(self.arr::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("metadata arrays nested too deeply".into());
                }
                let inner = self.u32()?;
                let n = self.count(1)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::Int(self.u64()? as i64),
            11 => MetaValue::Int(i64::from_le_bytes(self.arr()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.arr()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, LoadError> {
        let io = |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and the file is not modified while we hold it; a
        // concurrent truncation by another process is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (meta, tensors) = parse(&mmap).map_err(|what| LoadError::Corrupt {
            path: path.to_path_buf(),
            what,
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            meta,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw bytes of a tensor from the directory.
    pub fn data(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta.get(key)
    }
}

type Parsed = (HashMap<String, MetaValue>, HashMap<String, TensorInfo>);

fn parse(buf: &[u8]) -> R<Parsed> {
    let mut r = Reader { buf, pos: 0 };
    if r.take(4)? != b"GGUF" {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version}"));
    }
    let n_tensors = r.count(24)?;
    let n_kv = r.count(13)?;
    let mut meta = HashMap::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let v = r
            .value(ty, 0)
            .map_err(|e| format!("metadata '{key}': {e}"))?;
        meta.insert(key, v);
    }
    let mut dir = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!("tensor '{name}': {n_dims} dimensions"));
        }
        let mut shape = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            shape.push(r.u64()? as usize);
        }
        shape.reverse();
        let raw_type = r.u32()?;
        let offset = r.u64()? as usize;
        dir.push((name, shape, raw_type, offset));
    }
    let align = meta
        .get("general.alignment")
        .and_then(MetaValue::as_u64)
        .unwrap_or(32) as usize;
    if align == 0 || !align.is_power_of_two() {
        return Err(format!("bad general.alignment {align}"));
    }
    let data_start = r.pos.div_ceil(align) * align;
    let mut tensors = HashMap::with_capacity(n_tensors);
    for (name, shape, raw_type, offset) in dir {
        let dtype = GgmlType::from_id(raw_type);
        let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let len = match (dtype, elems) {
            (_, None) => return Err(format!("tensor '{name}': shape {shape:?} overflows")),
            (Some(t), Some(n)) => t.byte_len(n).ok_or_else(|| {
                format!("tensor '{name}': {n} elements is not a whole number of {t:?} blocks")
            })?,
            (None, Some(_)) => 0,
        };
        let start = data_start
            .checked_add(offset)
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= buf.len()))
            .ok_or_else(|| format!("tensor '{name}' lies past the end of the file (truncated?)"))?;
        let dtype = dtype.unwrap_or(GgmlType::F32);
        tensors.insert(
            name,
            TensorInfo {
                shape,
                dtype,
                raw_type,
                start,
                len,
            },
        );
    }
    Ok((meta, tensors))
}
