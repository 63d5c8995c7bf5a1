//! GGML storage types and their dequantization to f32: F32, F16, BF16 and the block formats
//! Q8_0, Q4_0 and Q4_1 (32 values per block, one f16 scale, and for Q4_1 an f16 minimum);
//! `quantize` stores f32 values in any of them (random-weight models of a real format).
//! Also the F16/BF16 conversions used for safetensors, and `QuantMatrix`, the compact form
//! the CPU keeps a matrix in (`BlockFormat`).

use half::{bf16, f16};

use super::arena::HugeBuf;

/// Values per quantization block.
pub const QK: usize = 32;

/// How a `QuantMatrix` stores each run of 32 values (a block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockFormat {
    /// 4-bit values with a scale and a minimum (Q4_0, Q4_1): 16 bytes.
    Q4 = 0,
    /// 8-bit signed values with a scale (Q8_0): 32 bytes.
    Q8 = 1,
    /// IEEE half floats as stored (F16), no scale: 64 bytes.
    F16 = 2,
    /// bfloat16 as stored (BF16), no scale: 64 bytes.
    Bf16 = 3,
}

impl BlockFormat {
    /// Packed bytes of one block.
    pub const fn bytes(self) -> usize {
        match self {
            BlockFormat::Q4 => 16,
            BlockFormat::Q8 => 32,
            BlockFormat::F16 | BlockFormat::Bf16 => 64,
        }
    }

    /// Whether blocks carry a scale and a minimum (`QuantMatrix::scales`, `mins`).
    pub const fn scaled(self) -> bool {
        matches!(self, BlockFormat::Q4 | BlockFormat::Q8)
    }

    /// Block i's scale and minimum from a matrix's `scales` and `mins` (0 for the float
    /// formats, which have none).
    pub fn params(self, scales: &[f32], mins: &[f32], i: usize) -> (f32, f32) {
        match self.scaled() {
            true => (scales[i], mins[i]),
            false => (0.0, 0.0),
        }
    }

    /// Block `q` (`self.bytes()` bytes) as its 32 values, with scale `d` and minimum `m`
    /// (ignored by the float formats, which widen any run of values this way).
    pub fn widen(self, q: &[u8], d: f32, m: f32, out: &mut [f32]) {
        match self {
            BlockFormat::Q4 => {
                let (lo, hi) = out.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi).zip(q) {
                    *l = (q & 0x0f) as f32 * d + m;
                    *h = (q >> 4) as f32 * d + m;
                }
            }
            BlockFormat::Q8 => {
                for (o, &q) in out.iter_mut().zip(q) {
                    *o = (q as i8) as f32 * d + m;
                }
            }
            BlockFormat::F16 => {
                for (o, c) in out.iter_mut().zip(q.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            BlockFormat::Bf16 => {
                for (o, c) in out.iter_mut().zip(q.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }
}

/// A tensor storage type this engine can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32 x i8 with one f16 scale (34 bytes).
    Q8_0,
    /// 32 x 4-bit with one f16 scale, offset 8 (18 bytes).
    Q4_0,
    /// 32 x 4-bit with an f16 scale and an f16 minimum (20 bytes).
    Q4_1,
}

impl GgmlType {
    /// From the GGML type id; `None` for types not supported here.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Bytes for `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn byte_len(self, n: usize) -> Option<usize> {
        let block = |bytes: usize| n.is_multiple_of(QK).then_some(n / QK * bytes);
        match self {
            GgmlType::F32 => Some(n * 4),
            GgmlType::F16 | GgmlType::BF16 => Some(n * 2),
            GgmlType::Q8_0 => block(34),
            GgmlType::Q4_0 => block(18),
            GgmlType::Q4_1 => block(20),
        }
    }
}

impl std::str::FromStr for GgmlType {
    type Err = String;

    /// llama.cpp's names, any case: f32, f16, bf16, q8_0, q4_0, q4_1.
    fn from_str(s: &str) -> Result<GgmlType, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgmlType::F32,
            "f16" => GgmlType::F16,
            "bf16" => GgmlType::BF16,
            "q8_0" => GgmlType::Q8_0,
            "q4_0" => GgmlType::Q4_0,
            "q4_1" => GgmlType::Q4_1,
            _ => {
                return Err(format!(
                    "unknown type {s:?} (f32, f16, bf16, q8_0, q4_0, q4_1)"
                ))
            }
        })
    }
}

/// `values` stored as `ty` (the inverse of `dequantize`, up to rounding), or `None` if they
/// are not a whole number of blocks. The block formats round as llama.cpp's reference
/// quantizers do: Q8_0 scales by the largest magnitude over 127; Q4_0 by the value of
/// largest magnitude over -8; Q4_1 spans minimum to maximum in 15 steps.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(ty.byte_len(values.len())?);
    let h = |x: f32| f16::from_f32(x).to_le_bytes();
    let inv = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => values.iter().for_each(|&v| out.extend(h(v))),
        GgmlType::BF16 => values
            .iter()
            .for_each(|&v| out.extend(bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in values.chunks_exact(QK) {
                let d = b.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                out.extend(h(d));
                out.extend(b.iter().map(|v| (v * inv(d)).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            for b in values.chunks_exact(QK) {
                let (d, min) = if ty == GgmlType::Q4_0 {
                    let far = b
                        .iter()
                        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                    (far / -8.0, far) // level 0 is -8 steps
                } else {
                    let lo = b.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    ((hi - lo) / 15.0, lo)
                };
                out.extend(h(d));
                if ty == GgmlType::Q4_1 {
                    out.extend(h(min));
                }
                let q = |v: f32| ((v - min) * inv(d)).round().clamp(0.0, 15.0) as u8;
                out.extend((0..QK / 2).map(|j| q(b[j]) | q(b[j + QK / 2]) << 4));
            }
        }
    }
    Some(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `src` (exactly `ty.byte_len(out.len())` bytes) into `out`.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    debug_assert_eq!(Some(src.len()), ty.byte_len(out.len()));
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => BlockFormat::F16.widen(src, 0.0, 0.0, out),
        GgmlType::BF16 => BlockFormat::Bf16.widen(src, 0.0, 0.0, out),
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..]) {
                    *x = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..].iter().enumerate() {
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, &q) in b[4..].iter().enumerate() {
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + QK / 2] = (q >> 4) as f32 * d + m;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn dequantize_rows_gives_the_floats_of_dequantize() {
        let (rows, cols) = (3, 64);
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            let block = ty.byte_len(QK).unwrap();
            let mut src: Vec<u8> = (0..ty.byte_len(rows * cols).unwrap())
                .map(|i| (i * 37 % 251) as u8)
                .collect();
            for (i, b) in src.chunks_exact_mut(block).enumerate() {
                if block == 64 {
                    continue; // 16-bit floats: any bits are values
                }
                b[..2].copy_from_slice(&h(0.01 * (i + 1) as f32));
                if ty == GgmlType::Q4_1 {
                    b[2..4].copy_from_slice(&h(-0.3 + 0.1 * i as f32));
                }
            }
            let mut want = vec![0f32; rows * cols];
            dequantize(ty, &src, &mut want);
            let q = QuantMatrix::from_ggml(ty, &src, rows, cols).unwrap();
            let mut got = vec![0f32; 2 * cols];
            q.dequantize_rows(1, &mut got);
            // the same bits (NaN included: not equal to itself)
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want[cols..]), "{ty:?}");
        }
    }

    #[test]
    fn permute_rows_moves_whole_rows_of_every_format() {
        let (rows, cols) = (4, 64);
        let from = [2, 0, 3, 1];
        for ty in [GgmlType::Q4_1, GgmlType::F16] {
            let mut src: Vec<u8> = (0..ty.byte_len(rows * cols).unwrap())
                .map(|i| (i * 29 % 113) as u8)
                .collect();
            if ty == GgmlType::Q4_1 {
                for (i, b) in src.chunks_exact_mut(20).enumerate() {
                    b[..2].copy_from_slice(&h(0.02 * (i + 1) as f32));
                    b[2..4].copy_from_slice(&h(-0.1 * i as f32));
                }
            }
            let q = QuantMatrix::from_ggml(ty, &src, rows, cols).unwrap();
            let mut want = vec![0f32; rows * cols];
            q.dequantize_rows(0, &mut want);
            let mut got = vec![0f32; rows * cols];
            q.permute_rows(&from).dequantize_rows(0, &mut got);
            for (r, &f) in from.iter().enumerate() {
                assert_eq!(
                    got[r * cols..(r + 1) * cols],
                    want[f * cols..(f + 1) * cols],
                    "{ty:?} row {r}"
                );
            }
        }
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut out);
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);
    }

    #[test]
    fn q4_0_and_q4_1_nibble_order() {
        let qs: Vec<u8> = (0..16).map(|j| (j as u8) | ((15 - j as u8) << 4)).collect();
        let mut b = h(2.0).to_vec();
        b.extend(&qs);
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut out);
        assert_eq!(
            (out[0], out[15], out[16], out[31]),
            (-16.0, 14.0, 14.0, -16.0)
        );
        let mut b = h(1.0).to_vec();
        b.extend(h(-3.0));
        b.extend(&qs);
        dequantize(GgmlType::Q4_1, &b, &mut out);
        assert_eq!(
            (out[0], out[15], out[16], out[31]),
            (-3.0, 12.0, 12.0, -3.0)
        );
    }

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        // a spread of magnitudes per block, one block of zeros, one with a single value
        let mut values: Vec<f32> = (0..256)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 0.01 * (1 + i / 32) as f32)
            .collect();
        values[64..96].fill(0.0);
        values[96..128].fill(0.0);
        values[100] = -1.5;
        for ty in ["f32", "F16", "bf16", "q8_0", "q4_0", "Q4_1"] {
            let ty: GgmlType = ty.parse().unwrap();
            let bytes = quantize(ty, &values).unwrap();
            assert_eq!(Some(bytes.len()), ty.byte_len(values.len()), "{ty:?}");
            let mut back = vec![0f32; values.len()];
            dequantize(ty, &bytes, &mut back);
            for (b, (v, w)) in values.chunks(QK).zip(back.chunks(QK)).enumerate() {
                let (lo, hi) = v
                    .iter()
                    .fold((0f32, 0f32), |(l, h), &x| (l.min(x), h.max(x)));
                let step = match ty {
                    GgmlType::F32 => 0.0,
                    GgmlType::F16 => hi.max(-lo) / 1024.0,
                    GgmlType::BF16 => hi.max(-lo) / 128.0,
                    GgmlType::Q8_0 => hi.max(-lo) / 127.0,
                    // levels -8..=7 steps of the largest magnitude's sign: a value of the
                    // other sign past 7 steps is clamped, a step at most
                    GgmlType::Q4_0 => hi.max(-lo) / 4.0,
                    GgmlType::Q4_1 => (hi - lo) / 15.0,
                };
                for (x, y) in v.iter().zip(w) {
                    // half a step, and the scale's own rounding to f16
                    let bound = step * 0.5 + x.abs() * 2e-3;
                    assert!((x - y).abs() <= bound, "{ty:?} block {b}: {x} -> {y}");
                }
            }
        }
        assert_eq!(quantize(GgmlType::Q4_1, &values[..33]), None);
        assert!("q5_k".parse::<GgmlType>().is_err());
    }

    #[test]
    fn byte_len_needs_whole_blocks() {
        assert_eq!(GgmlType::Q4_1.byte_len(64), Some(40));
        assert_eq!(GgmlType::Q8_0.byte_len(33), None);
        assert_eq!(GgmlType::BF16.byte_len(3), Some(6));
    }
}

/// A matrix kept in its file's compact form for the CPU, 32 values a block: 4- or 8-bit
/// values with each block's scale (and minimum) already widened to f32 (row r, block b holds
/// `w = scale * q + min` for its 32 values; `min` is 0 for Q8_0 and `-8 * scale` for Q4_0),
/// or 16-bit floats as stored (no scales).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    /// The blocks' format. 4-bit blocks: low nibbles are values 0..16 of the block, high
    /// nibbles 16..32.
    pub format: BlockFormat,
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of 32).
    pub cols: usize,
    /// Per block: scale (empty for the float formats).
    pub scales: HugeBuf<f32>,
    /// Per block: minimum, added once per value (empty for the float formats).
    pub mins: HugeBuf<f32>,
    /// The packed values, block after block, row after row.
    pub qs: HugeBuf<u8>,
}

impl QuantMatrix {
    /// Re-packs a `rows x cols` matrix of GGML blocks (`Q8_0`, `Q4_0` or `Q4_1`) or keeps its
    /// 16-bit floats (`F16`, `BF16`); `None` for other types or shapes.
    pub fn from_ggml(ty: GgmlType, src: &[u8], rows: usize, cols: usize) -> Option<QuantMatrix> {
        if !cols.is_multiple_of(QK) || ty.byte_len(rows * cols) != Some(src.len()) {
            return None;
        }
        let (block, format) = match ty {
            GgmlType::Q8_0 => (34, BlockFormat::Q8),
            GgmlType::Q4_0 => (18, BlockFormat::Q4),
            GgmlType::Q4_1 => (20, BlockFormat::Q4),
            GgmlType::F16 | GgmlType::BF16 => {
                let format = if ty == GgmlType::F16 {
                    BlockFormat::F16
                } else {
                    BlockFormat::Bf16
                };
                return Some(QuantMatrix {
                    format,
                    rows,
                    cols,
                    scales: HugeBuf::empty(),
                    mins: HugeBuf::empty(),
                    qs: src.into(),
                });
            }
            _ => return None,
        };
        let nb = rows * cols / QK;
        let (mut scales, mut mins) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
        let mut qs = Vec::with_capacity(nb * format.bytes());
        for b in src.chunks_exact(block) {
            let d = f16_at(b, 0);
            let (min, data) = match ty {
                GgmlType::Q8_0 => (0.0, &b[2..]),
                GgmlType::Q4_0 => (-8.0 * d, &b[2..]),
                _ => (f16_at(b, 2), &b[4..]),
            };
            scales.push(d);
            mins.push(min);
            qs.extend_from_slice(data);
        }
        Some(QuantMatrix {
            format,
            rows,
            cols,
            scales: scales.into(),
            mins: mins.into(),
            qs: qs.into(),
        })
    }

    /// Packed bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.bytes()
    }

    /// Rows `r0..` of the matrix as f32, as many as fill `out` (`out.len() / cols` rows).
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let first = r0 * (self.cols / QK);
        let bb = self.format.bytes();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let i = first + b;
            let (d, m) = self.format.params(&self.scales, &self.mins, i);
            self.format.widen(&self.qs[i * bb..(i + 1) * bb], d, m, o);
        }
    }

    /// Reorders rows: row `i` of the result is row `from[i]` of `self`.
    pub fn permute_rows(&self, from: &[usize]) -> QuantMatrix {
        let (rb, nb) = (self.row_bytes(), self.cols / QK);
        let (mut qs, mut scales, mut mins) = (Vec::with_capacity(self.qs.len()), vec![], vec![]);
        for &r in from {
            qs.extend_from_slice(&self.qs[r * rb..(r + 1) * rb]);
            if self.format.scaled() {
                scales.extend_from_slice(&self.scales[r * nb..(r + 1) * nb]);
                mins.extend_from_slice(&self.mins[r * nb..(r + 1) * nb]);
            }
        }
        QuantMatrix {
            qs: qs.into(),
            scales: scales.into(),
            mins: mins.into(),
            ..*self
        }
    }
}
