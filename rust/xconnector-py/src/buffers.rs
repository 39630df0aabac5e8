//! Python inputs as Rust data: token ids as an owned `Vec<u32>` (copied before the GIL is
//! released), payloads and output buffers as borrowed byte regions (no copy; the exporter is held
//! until the call returns, so the memory cannot move or be freed).

use std::ffi::CStr;
use std::os::raw::c_char;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyString, PyTuple};

use crate::errors::invalid_input;

/// A `Py_buffer` obtained with `PyObject_GetBuffer`, released on drop.
struct RawBuffer {
    view: Box<ffi::Py_buffer>,
}

impl RawBuffer {
    /// Any exporter, any format, with format, shape and strides filled in.
    fn get(obj: &Bound<'_, PyAny>) -> Option<Self> {
        // SAFETY: an all-zero Py_buffer is a valid "empty" value for PyObject_GetBuffer to fill.
        let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: obj is a live object (we hold the GIL); view points to writable storage.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, ffi::PyBUF_FULL_RO) };
        if rc != 0 {
            // Not an exporter: clear the TypeError it set; callers try other conversions.
            // SAFETY: the GIL is held.
            unsafe { ffi::PyErr_Clear() };
            return None;
        }
        Some(Self { view })
    }

    fn len(&self) -> usize {
        self.view.len as usize
    }

    fn readonly(&self) -> bool {
        self.view.readonly != 0
    }

    fn c_contiguous(&self) -> bool {
        // SAFETY: the view was filled by a successful PyObject_GetBuffer.
        unsafe { ffi::PyBuffer_IsContiguous(&*self.view, b'C' as c_char) != 0 }
    }

    fn format(&self) -> &str {
        if self.view.format.is_null() {
            return "B";
        }
        // SAFETY: a non-null format is a NUL-terminated string owned by the exporter.
        unsafe { CStr::from_ptr(self.view.format) }.to_str().unwrap_or("?")
    }

    fn ptr(&self) -> *mut u8 {
        self.view.buf.cast()
    }
}

impl Drop for RawBuffer {
    fn drop(&mut self) {
        // Buffers are only created and dropped while attached to the interpreter.
        // SAFETY: the view was filled by a successful PyObject_GetBuffer and is released once.
        unsafe { ffi::PyBuffer_Release(&mut *self.view) };
    }
}

/// A contiguous byte region of a Python object: a buffer exporter, or a CPU torch tensor (which
/// exports no buffer, and whose bfloat16 dtype numpy cannot represent).
pub struct ByteRegion<'py> {
    _buffer: Option<RawBuffer>,
    _owner: Bound<'py, PyAny>,
    ptr: *mut u8,
    len: usize,
    readonly: bool,
}

impl<'py> ByteRegion<'py> {
    pub fn get(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        let py = obj.py();
        if let Some(buf) = RawBuffer::get(obj) {
            if !buf.c_contiguous() {
                return Err(invalid_input(
                    py,
                    format!("{what} must be C-contiguous; pass a contiguous copy (numpy.ascontiguousarray / tensor.contiguous())"),
                ));
            }
            let (ptr, len, readonly) = (buf.ptr(), buf.len(), buf.readonly());
            return Ok(Self { _buffer: Some(buf), _owner: obj.clone(), ptr, len, readonly });
        }
        if obj.hasattr("data_ptr")? && obj.hasattr("is_contiguous")? {
            return Self::from_tensor(obj, what);
        }
        Err(invalid_input(
            py,
            format!(
                "{what} must support the buffer protocol (bytes, bytearray, memoryview, numpy array) or be a CPU torch tensor; got {}",
                type_name(obj)
            ),
        ))
    }

    fn from_tensor(t: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        let py = t.py();
        let device: String = t.getattr("device")?.getattr("type")?.extract()?;
        if device != "cpu" {
            return Err(invalid_input(
                py,
                format!("{what} is a tensor on '{device}'; the engine reads and writes host memory: pass a CPU tensor"),
            ));
        }
        if !t.call_method0("is_contiguous")?.extract::<bool>()? {
            return Err(invalid_input(py, format!("{what} must be contiguous; pass tensor.contiguous()")));
        }
        let ptr = t.call_method0("data_ptr")?.extract::<usize>()? as *mut u8;
        let numel: usize = t.call_method0("numel")?.extract()?;
        let elem: usize = t.call_method0("element_size")?.extract()?;
        Ok(Self { _buffer: None, _owner: t.clone(), ptr, len: numel * elem, readonly: false })
    }

    /// The bytes, for reading while detached. Valid as long as `self` lives.
    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the exporter (or tensor) is held by `self`, so ptr..ptr+len stays valid.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, for writing; an error for read-only exporters such as `bytes`.
    pub fn as_mut_slice(&mut self, py: Python<'_>, what: &str) -> PyResult<&mut [u8]> {
        if self.readonly {
            return Err(invalid_input(
                py,
                format!("{what} is read-only; pass a writable buffer (bytearray, numpy array, CPU tensor)"),
            ));
        }
        if self.len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: writable per the exporter; held by `self`; `&mut self` makes this the only slice.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

fn token_from_i128(py: Python<'_>, v: i128, index: usize) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| {
        let why = if v < 0 { "is negative" } else { "does not fit in 32 bits" };
        invalid_input(py, format!("token id {v} at index {index} {why}; token ids are vocabulary indices in 0..2**32"))
    })
}

fn tokens_from_items<'py>(py: Python<'py>, items: impl Iterator<Item = Bound<'py, PyAny>>) -> PyResult<Vec<u32>> {
    let mut out = Vec::with_capacity(items.size_hint().0);
    for (i, item) in items.enumerate() {
        let v: i64 = item
            .extract()
            .map_err(|_| invalid_input(py, format!("token ids must be integers; item {i} is {}", type_name(&item))))?;
        out.push(token_from_i128(py, i128::from(v), i)?);
    }
    Ok(out)
}

/// Integer buffer formats (struct-module codes) and whether they are signed.
fn int_format(fmt: &str) -> Option<(usize, bool)> {
    let code = fmt.trim_start_matches(['@', '=', '<']);
    Some(match code {
        "b" => (1, true),
        "B" => (1, false),
        "h" => (2, true),
        "H" => (2, false),
        "i" => (4, true),
        "I" => (4, false),
        "l" | "q" | "n" => (8, true),
        "L" | "Q" | "N" => (8, false),
        _ => return None,
    })
}

fn tokens_from_buffer(py: Python<'_>, buf: &RawBuffer) -> PyResult<Vec<u32>> {
    let fmt = buf.format();
    let Some((size, signed)) = int_format(fmt).filter(|(s, _)| *s == buf.view.itemsize as usize) else {
        return Err(invalid_input(
            py,
            format!("token ids must be integers, got a buffer of format '{fmt}'; use array('I', ...) or a numpy integer array"),
        ));
    };
    if buf.view.ndim > 1 || !buf.c_contiguous() {
        return Err(invalid_input(py, "token ids must be a 1-D contiguous array; flatten or copy it first"));
    }
    let n = buf.len() / size;
    let p = buf.ptr().cast_const();
    let mut out = Vec::with_capacity(n);
    macro_rules! convert {
        ($t:ty) => {{
            // SAFETY: a contiguous buffer of n items of this exact size, held for this call.
            let items = unsafe { std::slice::from_raw_parts(p.cast::<$t>(), n) };
            if size == 4 && !signed {
                // The common case (array('I'), np.uint32) needs no range check.
                out.extend(items.iter().map(|&v| v as u32));
            } else {
                for (i, &v) in items.iter().enumerate() {
                    out.push(token_from_i128(py, v as i128, i)?);
                }
            }
        }};
    }
    match (size, signed) {
        (1, true) => convert!(i8),
        (1, false) => convert!(u8),
        (2, true) => convert!(i16),
        (2, false) => convert!(u16),
        (4, true) => convert!(i32),
        (4, false) => convert!(u32),
        (8, true) => convert!(i64),
        _ => convert!(u64),
    }
    Ok(out)
}

/// Token ids from a list or tuple of ints, any integer buffer (array('I'), numpy), a CPU torch
/// tensor, or any other iterable of ints. Always an owned copy.
pub fn tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let py = obj.py();
    if let Ok(list) = obj.cast::<PyList>() {
        return tokens_from_items(py, list.iter());
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        return tokens_from_items(py, tuple.iter());
    }
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyByteArray>() {
        return Err(invalid_input(
            py,
            format!(
                "token ids must be integers, not {}; pass the tokenizer's ids, not text or raw bytes",
                type_name(obj)
            ),
        ));
    }
    if let Some(buf) = RawBuffer::get(obj) {
        return tokens_from_buffer(py, &buf);
    }
    if obj.hasattr("numpy")? && obj.hasattr("data_ptr")? {
        let arr = obj.call_method0("numpy").map_err(|e| {
            invalid_input(py, format!("token ids tensor could not be read on the host ({e}); pass tensor.cpu()"))
        })?;
        return tokens(&arr);
    }
    match obj.try_iter() {
        Ok(it) => {
            let items = it.collect::<PyResult<Vec<_>>>()?;
            tokens_from_items(py, items.into_iter())
        }
        Err(_) => Err(invalid_input(
            py,
            format!("token ids must be a list of ints, array('I'), or a numpy integer array; got {}", type_name(obj)),
        )),
    }
}
