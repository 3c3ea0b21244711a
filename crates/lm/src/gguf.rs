//! A bounds-checked reader for GGUF files (llama.cpp's format), with dequantisation of F32, F16,
//! BF16, Q8_0, Q4_0 and Q4_1 tensors.
//!
//! Layout (little-endian): magic `GGUF`, version (2 or 3), tensor count, metadata count, the
//! metadata key/values, the tensor infos (name, dims innermost-first, type, offset), then the
//! tensor data at `general.alignment` (default 32). Every length and offset is checked against the
//! file before use, so a truncated or corrupt file is an error, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::LmError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 8;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned integer (u8, u16, u32 or u64 in the file).
    Uint(u64),
    /// Signed integer (i8, i16, i32 or i64 in the file).
    Int(i64),
    /// Float (f32 or f64 in the file).
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values.
    Array(Vec<GgufValue>),
}

/// ggml tensor types this reader knows; others are kept by number and rejected on read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale d, 32 × i8; x = d·q.
    Q8_0,
    /// Blocks of 32: f16 scale d, 16 bytes of nibbles; x = d·(q − 8).
    Q4_0,
    /// Blocks of 32: f16 scale d, f16 min m, 16 bytes of nibbles; x = d·q + m.
    Q4_1,
    /// Any other type id (K-quants, ...): listed by `inspect`, not dequantised.
    Unsupported(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            other => Self::Unsupported(other),
        }
    }

    /// (elements per block, bytes per block).
    fn block(&self) -> Option<(u64, u64)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 | Self::Bf16 => Some((1, 2)),
            Self::Q8_0 => Some((32, 34)),
            Self::Q4_0 => Some((32, 18)),
            Self::Q4_1 => Some((32, 20)),
            Self::Unsupported(_) => None,
        }
    }

    /// The name llama.cpp uses.
    pub fn name(&self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::Bf16 => "BF16".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Unsupported(id) => format!("type {id}"),
        }
    }
}

/// One tensor's header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// Its name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions as ggml lists them: innermost (contiguous) first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub dtype: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Dimensions outermost first (row-major, as numpy/PyTorch write them).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    /// Format version.
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor headers, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
}

/// Little-endian cursor whose every read is checked against the end of the buffer.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, {remaining} left",
                self.pos
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<GgufValue, String> {
        Ok(match type_id {
            0 => GgufValue::Uint(self.u8(key)? as u64),
            1 => GgufValue::Int(self.u8(key)? as i8 as i64),
            2 => GgufValue::Uint(self.u16(key)? as u64),
            3 => GgufValue::Int(self.u16(key)? as i16 as i64),
            4 => GgufValue::Uint(self.u32(key)? as u64),
            5 => GgufValue::Int(self.u32(key)? as i32 as i64),
            6 => GgufValue::Float(f32::from_bits(self.u32(key)?) as f64),
            7 => GgufValue::Bool(self.u8(key)? != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(format!("metadata `{key}`: arrays nested too deeply"));
                }
                let item_type = self.u32(key)?;
                let count = self.u64(key)?;
                // Every item takes at least one byte: a count beyond the file is corrupt.
                let remaining = (self.bytes.len() - self.pos) as u64;
                if count > remaining {
                    return Err(format!(
                        "metadata `{key}`: array of {count} items in {remaining} bytes"
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::Uint(self.u64(key)?),
            11 => GgufValue::Int(self.u64(key)? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64(key)?)),
            other => return Err(format!("metadata `{key}`: unknown value type {other}")),
        })
    }
}

impl GgufFile {
    /// Reads and parses a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LmError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| LmError::io(path, e))?;
        Self::parse(bytes, path)
    }

    /// Parses GGUF bytes; `path` names them in errors.
    pub fn parse(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<Self, LmError> {
        let path = path.as_ref().to_path_buf();
        let err = |reason: String| LmError::Gguf {
            path: path.clone(),
            reason,
        };
        let mut c = Cursor {
            bytes: &bytes,
            pos: 0,
        };
        let magic = c.take(4, "magic").map_err(&err)?;
        if magic != MAGIC {
            return Err(err(format!(
                "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
            )));
        }
        let version = c.u32("version").map_err(&err)?;
        if !(2..=3).contains(&version) {
            return Err(err(format!(
                "unsupported GGUF version {version} (2 and 3 are)"
            )));
        }
        let n_tensors = c.u64("tensor count").map_err(&err)?;
        let n_kv = c.u64("metadata count").map_err(&err)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key").map_err(&err)?;
            let type_id = c.u32(&key).map_err(&err)?;
            let value = c.value(type_id, &key, 0).map_err(&err)?;
            metadata.insert(key, value);
        }
        // A tensor info takes at least 8 + 4 + 4 + 8 bytes.
        if n_tensors > (bytes.len() as u64) / 24 {
            return Err(err(format!(
                "{n_tensors} tensors cannot fit in {} bytes",
                bytes.len()
            )));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name").map_err(&err)?;
            let n_dims = c.u32(&name).map_err(&err)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(err(format!("tensor `{name}`: {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<_>, _>>()
                .map_err(&err)?;
            let dtype = GgmlType::from_id(c.u32(&name).map_err(&err)?);
            let offset = c.u64(&name).map_err(&err)?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                dtype,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::Uint(a)) if *a > 0 && a.is_power_of_two() => *a,
            Some(other) => {
                return Err(err(format!(
                    "general.alignment = {other:?} is not a power of two"
                )));
            }
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (bytes.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            let n = t
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| err(format!("tensor `{}`: element count overflows", t.name)))?;
            if let Some((per_block, block_bytes)) = t.dtype.block() {
                if n % per_block != 0 {
                    return Err(err(format!(
                        "tensor `{}`: {n} elements is not a whole number of {} blocks",
                        t.name,
                        t.dtype.name()
                    )));
                }
                let size = (n / per_block).saturating_mul(block_bytes);
                let end = t.offset.checked_add(size);
                if end.is_none_or(|end| end > data_len) {
                    return Err(err(format!(
                        "tensor `{}`: {size} bytes at offset {} run past the end of the file (truncated?)",
                        t.name, t.offset
                    )));
                }
            }
        }
        Ok(Self {
            path,
            version,
            metadata,
            tensors,
            bytes,
            data_start: data_start as usize,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn error(&self, reason: impl Into<String>) -> LmError {
        LmError::Gguf {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&GgufValue, LmError> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.error(format!("missing metadata `{key}`")))
    }

    /// An unsigned integer metadata value.
    pub fn get_uint(&self, key: &str) -> Result<u64, LmError> {
        match self.get(key)? {
            GgufValue::Uint(v) => Ok(*v),
            GgufValue::Int(v) if *v >= 0 => Ok(*v as u64),
            other => Err(self.error(format!(
                "metadata `{key}` = {other:?} is not an unsigned integer"
            ))),
        }
    }

    /// A float metadata value.
    pub fn get_float(&self, key: &str) -> Result<f64, LmError> {
        match self.get(key)? {
            GgufValue::Float(v) => Ok(*v),
            other => Err(self.error(format!("metadata `{key}` = {other:?} is not a float"))),
        }
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, LmError> {
        match self.get(key)? {
            GgufValue::String(v) => Ok(v),
            other => Err(self.error(format!("metadata `{key}` = {other:?} is not a string"))),
        }
    }

    /// A string-array metadata value.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, LmError> {
        match self.get(key)? {
            GgufValue::Array(items) => items
                .iter()
                .map(|v| match v {
                    GgufValue::String(s) => Ok(s.as_str()),
                    other => {
                        Err(self.error(format!("metadata `{key}` holds {other:?}, not strings")))
                    }
                })
                .collect(),
            other => Err(self.error(format!("metadata `{key}` = {other:?} is not an array"))),
        }
    }

    /// The tensor header of `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's bytes as stored (blocks of its type), and its type's bytes per block.
    pub(crate) fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<(&[u8], usize), LmError> {
        let (per_block, block_bytes) = info.dtype.block().ok_or_else(|| {
            self.error(format!(
                "tensor `{}` has {}, which chorus cannot dequantise (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                info.name,
                info.dtype.name()
            ))
        })?;
        let n = info.n_elements();
        let start = self.data_start + info.offset as usize; // range checked in `parse`
        let raw = &self.bytes[start..start + (n / per_block * block_bytes) as usize];
        Ok((raw, block_bytes as usize))
    }

    /// Dequantises a tensor to f32, returning its row-major shape (outermost first) and values.
    pub fn tensor_f32(&self, info: &GgufTensorInfo) -> Result<(Vec<usize>, Vec<f32>), LmError> {
        let (raw, block_bytes) = self.tensor_bytes(info)?;
        let n = info.n_elements();
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mut out = Vec::with_capacity(n as usize);
        match info.dtype {
            GgmlType::F32 => out.extend(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            GgmlType::F16 => out.extend(raw.chunks_exact(2).map(f16)),
            GgmlType::Bf16 => out.extend(
                raw.chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            GgmlType::Q8_0 => {
                for block in raw.chunks_exact(34) {
                    let d = f16(&block[0..2]);
                    out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
                }
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let q4_1 = info.dtype == GgmlType::Q4_1;
                let header = if q4_1 { 4 } else { 2 };
                for block in raw.chunks_exact(block_bytes) {
                    let d = f16(&block[0..2]);
                    let (m, offset) = if q4_1 {
                        (f16(&block[2..4]), 0.0)
                    } else {
                        (0.0, 8.0)
                    };
                    let qs = &block[header..];
                    // Element j < 16 is the low nibble of byte j, element j + 16 its high nibble.
                    out.extend(qs.iter().map(|&b| d * ((b & 0x0f) as f32 - offset) + m));
                    out.extend(qs.iter().map(|&b| d * ((b >> 4) as f32 - offset) + m));
                }
            }
            GgmlType::Unsupported(_) => unreachable!("rejected above"),
        }
        Ok((info.shape(), out))
    }
}
