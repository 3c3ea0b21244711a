//! A small GGUF writer for tests: builds real files (metadata, F32/F16/Q8_0/Q4_0/Q4_1 tensors)
//! with ggml's quantisation formulas, so the reader is exercised on the format itself.

use crate::GgufValue;

/// What to store a tensor as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
}

pub struct Writer {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue, with_type: bool) {
    let (type_id, body): (u32, Vec<u8>) = match v {
        GgufValue::Uint(x) => (4, (*x as u32).to_le_bytes().to_vec()),
        GgufValue::Int(x) => (5, (*x as i32).to_le_bytes().to_vec()),
        GgufValue::Float(x) => (6, (*x as f32).to_le_bytes().to_vec()),
        GgufValue::Bool(b) => (7, vec![*b as u8]),
        GgufValue::String(s) => {
            let mut b = Vec::new();
            put_str(&mut b, s);
            (8, b)
        }
        GgufValue::Array(items) => {
            let mut b = Vec::new();
            let item_type = match items.first() {
                Some(GgufValue::Uint(_)) => 4u32,
                Some(GgufValue::Int(_)) => 5,
                Some(GgufValue::Float(_)) => 6,
                Some(GgufValue::Bool(_)) => 7,
                _ => 8,
            };
            b.extend(item_type.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(&mut b, item, false);
            }
            (9, b)
        }
    };
    if with_type {
        out.extend(type_id.to_le_bytes());
    }
    out.extend(body);
}

/// ggml's Q8_0: d = max|x| / 127, q = round(x / d).
fn q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
    }
    out
}

/// ggml's Q4_0: d = (signed value of largest magnitude) / −8, q = clamp(round(x/d + 8), 0, 15).
fn q4_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        let max = block
            .iter()
            .copied()
            .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    out
}

/// ggml's Q4_1: d = (max − min) / 15, m = min, q = clamp(round((x − m)/d), 0, 15).
fn q4_1(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(half::f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    out
}

impl Writer {
    pub fn new() -> Self {
        Self {
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn meta(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// `shape` outermost first (as PyTorch); stored innermost first (as ggml).
    pub fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
        store: Store,
    ) -> &mut Self {
        let (type_id, bytes) = match store {
            Store::F32 => (0, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            Store::F16 => (
                1,
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            Store::Q8_0 => (8, q8_0(values)),
            Store::Q4_0 => (2, q4_0(values)),
            Store::Q4_1 => (3, q4_1(values)),
        };
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.to_string(), dims, type_id, bytes));
        self
    }

    /// A tensor with a raw type id and payload (for malformed-input tests).
    pub fn raw_tensor(
        &mut self,
        name: &str,
        dims: Vec<u64>,
        type_id: u32,
        bytes: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push((name.to_string(), dims, type_id, bytes));
        self
    }

    /// The file: tensor data at `general.alignment` where the metadata sets it, else 32.
    pub fn bytes(&self) -> Vec<u8> {
        let alignment = self
            .metadata
            .iter()
            .find_map(|(key, value)| match (key.as_str(), value) {
                ("general.alignment", GgufValue::Uint(a)) if *a > 0 => Some(*a as usize),
                _ => None,
            })
            .unwrap_or(32);
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            put_value(&mut out, value, true);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, type_id, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset += bytes.len().div_ceil(alignment) as u64 * alignment as u64;
        }
        while !out.len().is_multiple_of(alignment) {
            out.push(0);
        }
        for (_, _, _, bytes) in &self.tensors {
            out.extend(bytes);
            while !out.len().is_multiple_of(alignment) {
                out.push(0);
            }
        }
        out
    }
}
