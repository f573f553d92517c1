//! JPEG with 12-bit samples (DICOM's "JPEG Extended", 1.2.840.10008.1.2.4.51, process 4),
//! which the pure-Rust JPEG decoders do not read (they stop at 8 bits), through
//! libjpeg-turbo 3 (`tj3Decompress12`), built from the source `turbojpeg-sys` bundles.
//! Like every codec, it runs only in the decoding child ([`crate::decode`]).
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int};
use turbojpeg_sys as tj;

/// One decoded greyscale frame.
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub samples: Vec<i16>,
}

/// The largest image decoded (a guard against headers that claim absurd sizes).
const MAX_PIXELS: c_int = 100_000_000;
/// Progressive scans allowed (a guard against files built to take forever).
const MAX_SCANS: c_int = 500;

struct Handle(tj::tjhandle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init, is not null, and is destroyed only here.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

impl Handle {
    fn error(&self) -> String {
        // SAFETY: a valid handle; libjpeg-turbo returns a NUL-terminated string it owns.
        let text = unsafe { tj::tj3GetErrorStr(self.0) };
        if text.is_null() {
            return "unknown libjpeg-turbo error".into();
        }
        // SAFETY: checked non-null above; the string lives as long as the handle.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: a valid handle and one of the library's own parameter codes.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    fn set(&self, param: tj::TJPARAM, value: c_int) -> Result<(), String> {
        // SAFETY: a valid handle and one of the library's own parameter codes.
        if unsafe { tj::tj3Set(self.0, param as c_int, value) } == 0 {
            Ok(())
        } else {
            Err(self.error())
        }
    }
}

/// Decodes one 12-bit JPEG stream to greyscale samples.
pub fn decode(jpeg: &[u8]) -> Result<Frame, String> {
    // SAFETY: tj3Init has no preconditions; a null result is handled.
    let raw = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
    if raw.is_null() {
        return Err("libjpeg-turbo cannot start a decompressor".into());
    }
    let handle = Handle(raw);
    handle.set(tj::TJPARAM_TJPARAM_MAXPIXELS, MAX_PIXELS)?;
    handle.set(tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_SCANS)?;
    // SAFETY: the pointer and length describe `jpeg`, which outlives the call.
    if unsafe { tj::tj3DecompressHeader(handle.0, jpeg.as_ptr(), jpeg.len() as tj::size_t) } != 0 {
        return Err(format!("not a readable JPEG stream: {}", handle.error()));
    }
    let precision = handle.get(tj::TJPARAM_TJPARAM_PRECISION);
    if precision != 12 {
        return Err(format!(
            "a JPEG Extended stream with {precision}-bit samples: only 8 and 12 bits are read"
        ));
    }
    let (width, height) = (
        handle.get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
        handle.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    let (Ok(w), Ok(h)) = (usize::try_from(width), usize::try_from(height)) else {
        return Err(format!(
            "the JPEG header gives a size of {width} × {height}"
        ));
    };
    let count = w
        .checked_mul(h)
        .filter(|n| *n > 0 && *n <= MAX_PIXELS as usize)
        .ok_or_else(|| format!("the JPEG header gives a size of {w} × {h}"))?;
    let mut samples = vec![0i16; count];
    // SAFETY: `samples` holds width × height greyscale samples, which is what a pitch of 0
    // (width × 1 sample) with TJPF_GRAY writes; `jpeg` outlives the call.
    let status = unsafe {
        tj::tj3Decompress12(
            handle.0,
            jpeg.as_ptr(),
            jpeg.len() as tj::size_t,
            samples.as_mut_ptr(),
            0,
            tj::TJPF_TJPF_GRAY as c_int,
        )
    };
    // SAFETY: a valid handle.
    if status != 0 && unsafe { tj::tj3GetErrorCode(handle.0) } != tj::TJERR_TJERR_WARNING as c_int {
        return Err(format!(
            "the 12-bit JPEG can't be decoded: {}",
            handle.error()
        ));
    }
    Ok(Frame {
        width: w,
        height: h,
        samples,
    })
}
