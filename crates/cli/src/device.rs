//! The `--device` value: which backend runs the computation, checked against what was compiled in.

use std::fmt;
use std::str::FromStr;

/// A compute device as written on the command line: `cpu`, `wgpu`, `cuda`, `cuda:N`, `tch` or
/// `tch:cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The ndarray CPU backend (feature `ndarray`, the default; `openblas` adds OpenBLAS GEMM).
    #[default]
    Cpu,
    /// The default WebGPU adapter (feature `wgpu`).
    Wgpu,
    /// CUDA device N (feature `cuda`).
    Cuda(usize),
    /// LibTorch on the CPU (feature `tch`).
    TchCpu,
    /// LibTorch on CUDA device N (feature `tch`).
    TchCuda(usize),
}

/// Why a `--device` value cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Not one of the known spellings.
    #[error("unknown device `{0}`: expected cpu, wgpu, cuda, cuda:N, tch or tch:cuda:N")]
    Unknown(String),
    /// A known backend whose cargo feature was off at build time.
    #[error(
        "device `{device}` needs the `{feature}` backend, which this binary was built without: \
         {rebuild}"
    )]
    NotCompiled {
        /// The device as written.
        device: String,
        /// The cargo feature that provides it.
        feature: &'static str,
        /// The command that builds a binary with it.
        rebuild: String,
    },
    /// A compiled-in backend that this machine can't run: `cuda:N` whose driver can't be loaded
    /// or has no device N, `tch:cuda:N` where LibTorch sees no device N, `wgpu` without an
    /// adapter.
    #[error("device `{device}`: {problem}")]
    Unavailable {
        /// The device as written.
        device: String,
        /// What the driver said, or that there is none.
        problem: String,
    },
}

/// The names the NVIDIA driver's library goes by on Linux.
pub const CUDA_DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// The number of CUDA devices that the driver library (the first of `names` that loads) reports,
/// or why there is none. burn-cuda panics on a missing driver or device; this turns both into an
/// error before it starts.
pub fn cuda_device_count(names: &[&str]) -> Result<usize, String> {
    // SAFETY: loading the driver runs its initialisers, as burn-cuda's own loading does; the two
    // symbols are called with the signatures of CUDA's driver API (`CUresult cuInit(unsigned)`,
    // `CUresult cuDeviceGetCount(int*)`), and the library outlives the calls.
    unsafe {
        let Some(library) = names
            .iter()
            .find_map(|name| libloading::Library::new(name).ok())
        else {
            return Err(format!(
                "no CUDA driver on this machine ({} could not be loaded)",
                names.join(", ")
            ));
        };
        let init = library
            .get::<unsafe extern "C" fn(u32) -> i32>(b"cuInit\0")
            .map_err(|e| format!("the CUDA driver has no cuInit: {e}"))?;
        let count = library
            .get::<unsafe extern "C" fn(*mut i32) -> i32>(b"cuDeviceGetCount\0")
            .map_err(|e| format!("the CUDA driver has no cuDeviceGetCount: {e}"))?;
        match init(0) {
            0 => {}
            100 => return Ok(0), // CUDA_ERROR_NO_DEVICE
            code => {
                return Err(format!(
                    "the CUDA driver failed to start (cuInit: error {code})"
                ));
            }
        }
        let mut devices = 0i32;
        match count(&mut devices) {
            0 => Ok(devices.max(0) as usize),
            code => Err(format!(
                "the CUDA driver can't count its devices (error {code})"
            )),
        }
    }
}

/// The number of CUDA devices LibTorch sees (`torch::cuda::device_count`: 0 without a GPU, a
/// driver or with a CPU-only PyTorch), or the exception it raised. burn-tch panics on the first
/// tensor placed on a device that is not there; this turns that into an error before it starts.
#[cfg(feature = "tch")]
pub fn libtorch_cuda_device_count() -> Result<usize, String> {
    // SAFETY: LibTorch's C wrapper catches the C++ exception of `device_count` and records its
    // message, which `get_and_reset_last_err` hands over (malloc'd, freed here once read).
    unsafe {
        let count = torch_sys::cuda::atc_cuda_device_count();
        let error = torch_sys::get_and_reset_last_err();
        if !error.is_null() {
            let message = std::ffi::CStr::from_ptr(error)
                .to_string_lossy()
                .into_owned();
            libc::free(error.cast());
            return Err(format!("LibTorch could not count CUDA devices: {message}"));
        }
        Ok(count.max(0) as usize)
    }
}

/// The name of the adapter burn-wgpu's default device gets — the first that wgpu offers for the
/// graphics API burn-wgpu picks (Vulkan on Linux) at high performance — or why there is none.
#[cfg(feature = "wgpu")]
pub fn wgpu_adapter() -> Result<String, String> {
    use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    let backend = AutoGraphicsApi::backend();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: backend.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let request = instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
    });
    match futures_lite::future::block_on(request) {
        Ok(adapter) => Ok(adapter.get_info().name),
        Err(e) => Err(format!(
            "no {backend:?} adapter on this machine ({e}); without a GPU, Mesa's lavapipe runs \
             the shaders on the CPU (Debian: apt install mesa-vulkan-drivers)"
        )),
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" | "ndarray" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda(0)),
            "tch" | "tch:cpu" => Ok(Self::TchCpu),
            "tch:cuda" => Ok(Self::TchCuda(0)),
            other => {
                let index = |prefix: &str| other.strip_prefix(prefix).and_then(|n| n.parse().ok());
                index("cuda:")
                    .map(Self::Cuda)
                    .or_else(|| index("tch:cuda:").map(Self::TchCuda))
                    .ok_or_else(|| DeviceError::Unknown(s.to_string()))
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu => write!(f, "wgpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::TchCpu => write!(f, "tch"),
            Self::TchCuda(n) => write!(f, "tch:cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Whether GGUF models decode from their quantised blocks here
    /// ([`chorus_lm::Lm::from_gguf_for_decoding`]): on the CPU, with ndarray or LibTorch (there
    /// after [`DeviceSpec::prepare_decoding`]); not on GPUs, where every product would cross to
    /// the host.
    pub fn decodes_from_gguf_blocks(&self) -> bool {
        matches!(self, Self::Cpu | Self::TchCpu)
    }

    /// Readies the device for a command that decodes. On LibTorch's CPU device: LibTorch's own
    /// operations run on one thread. A decoding step's products and attention run on chorus's
    /// team of threads ([`chorus_lm`]'s host steps), and what is left to LibTorch is operations
    /// on a few rows, after each of which its OpenMP threads spin on the cores the team needs:
    /// SmolLM2 from its blocks decoded at ≈ 75 tok/s with LibTorch's two threads and ≈ 180 with
    /// one, and from f32 weights at ≈ 20 with either (docs/performance.md). A model without
    /// GGUF blocks decodes on that one thread, its prompt's prefill included.
    pub fn prepare_decoding(&self) {
        #[cfg(feature = "tch")]
        if matches!(self, Self::TchCpu) {
            // SAFETY: sets LibTorch's intra-op thread count; called before any tensor exists.
            unsafe { torch_sys::at_set_num_threads(1) };
        }
    }

    /// The cargo feature that compiles this device's backend.
    pub fn feature(&self) -> &'static str {
        match self {
            Self::Cpu => "ndarray",
            Self::Wgpu => "wgpu",
            Self::Cuda(_) => "cuda",
            Self::TchCpu | Self::TchCuda(_) => "tch",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn is_compiled(&self) -> bool {
        match self {
            Self::Cpu => cfg!(feature = "ndarray"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda(_) => cfg!(feature = "cuda"),
            Self::TchCpu | Self::TchCuda(_) => cfg!(feature = "tch"),
        }
    }

    /// `Ok` when the backend is compiled in, else an error saying which feature to enable.
    /// For `cuda:N`, also that the driver loads and has a device N; for `tch:cuda:N`, that
    /// LibTorch sees a device N; for `wgpu`, that there is an adapter (burn-cuda, burn-tch and
    /// burn-wgpu panic without them).
    pub fn check(&self) -> Result<Self, DeviceError> {
        if self.is_compiled() {
            let problem = match *self {
                Self::Cuda(index) => match cuda_device_count(CUDA_DRIVER_NAMES) {
                    Ok(count) if index < count => None,
                    Ok(count) => Some(format!(
                        "this machine has {count} CUDA device(s), numbered from 0"
                    )),
                    Err(problem) => Some(problem),
                },
                #[cfg(feature = "wgpu")]
                Self::Wgpu => wgpu_adapter().err(),
                #[cfg(feature = "tch")]
                Self::TchCuda(index) => match libtorch_cuda_device_count() {
                    Ok(count) if index < count => None,
                    Ok(count) => Some(format!(
                        "LibTorch sees {count} CUDA device(s) on this machine, numbered from 0 \
                         (none without a GPU, its driver, or with a CPU-only PyTorch)"
                    )),
                    Err(problem) => Some(problem),
                },
                _ => None,
            };
            if let Some(problem) = problem {
                return Err(DeviceError::Unavailable {
                    device: self.to_string(),
                    problem,
                });
            }
            Ok(*self)
        } else {
            Err(DeviceError::NotCompiled {
                device: self.to_string(),
                feature: self.feature(),
                rebuild: match self.feature() {
                    // torch-sys must find PyTorch 2.9.0 at build time.
                    "tch" => "run `cargo xtask setup-torch` (installs PyTorch 2.9.0 and builds \
                              target/tch/debug/chorus with it)"
                        .into(),
                    feature => format!(
                        "rebuild with `cargo build -p chorus-cli --release --features {feature}`"
                    ),
                },
            })
        }
    }
}

/// Runs `$body` with `$B` bound to the backend type (wrap it in `burn::backend::Autodiff` to train)
/// and `$device` to the device that `$spec` names. Arms for backends that were not compiled in return [`DeviceError::NotCompiled`].
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {{
        let spec: $crate::device::DeviceSpec = $spec.check()?;
        match spec {
            $crate::device::DeviceSpec::Cpu => {
                #[cfg(feature = "ndarray")]
                {
                    type $B = burn::backend::NdArray;
                    let $device = burn::backend::ndarray::NdArrayDevice::Cpu;
                    $body
                }
                #[cfg(not(feature = "ndarray"))]
                unreachable!("checked above")
            }
            $crate::device::DeviceSpec::Wgpu => {
                #[cfg(feature = "wgpu")]
                {
                    type $B = burn::backend::Wgpu;
                    let $device = burn::backend::wgpu::WgpuDevice::default();
                    $body
                }
                #[cfg(not(feature = "wgpu"))]
                unreachable!("checked above")
            }
            $crate::device::DeviceSpec::Cuda(_index) => {
                #[cfg(feature = "cuda")]
                {
                    type $B = burn::backend::Cuda;
                    let $device = burn::backend::cuda::CudaDevice::new(_index);
                    $body
                }
                #[cfg(not(feature = "cuda"))]
                unreachable!("checked above")
            }
            $crate::device::DeviceSpec::TchCpu | $crate::device::DeviceSpec::TchCuda(_) => {
                #[cfg(feature = "tch")]
                {
                    type $B = burn::backend::LibTorch;
                    let $device = match spec {
                        $crate::device::DeviceSpec::TchCuda(index) => {
                            burn::backend::libtorch::LibTorchDevice::Cuda(index)
                        }
                        _ => burn::backend::libtorch::LibTorchDevice::Cpu,
                    };
                    $body
                }
                #[cfg(not(feature = "tch"))]
                unreachable!("checked above")
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("WGPU".parse(), Ok(DeviceSpec::Wgpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("tch".parse(), Ok(DeviceSpec::TchCpu));
        assert_eq!("tch:cuda:1".parse(), Ok(DeviceSpec::TchCuda(1)));
        for bad in ["gpu", "cuda:", "cuda:x", "tch:cuda:x", ""] {
            assert!(
                matches!(bad.parse::<DeviceSpec>(), Err(DeviceError::Unknown(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_backend_that_was_not_compiled_says_which_feature_to_enable() {
        for spec in [
            DeviceSpec::Cpu,
            DeviceSpec::Wgpu,
            DeviceSpec::Cuda(1),
            DeviceSpec::TchCpu,
        ] {
            match spec.check() {
                Ok(_) => assert!(spec.is_compiled()),
                // Built with `cuda` on a machine without device 1, or with `wgpu` without an
                // adapter.
                Err(err @ DeviceError::Unavailable { .. }) => {
                    assert!(spec.is_compiled() && spec != DeviceSpec::Cpu, "{err}")
                }
                Err(err) => {
                    assert!(!spec.is_compiled());
                    let hint = match spec.feature() {
                        "tch" => "cargo xtask setup-torch".to_string(),
                        feature => format!("--features {feature}"),
                    };
                    assert!(err.to_string().contains(&hint), "{err}");
                }
            }
        }
    }

    /// Needs `cargo xtask setup-torch`'s build (`--features tch`): on this machine's LibTorch, the
    /// first CUDA device it does not have.
    #[cfg(feature = "tch")]
    #[test]
    fn a_libtorch_cuda_device_that_is_not_there_is_an_error_not_a_panic() {
        let count = libtorch_cuda_device_count().unwrap();
        let err = DeviceSpec::TchCuda(count).check().unwrap_err();
        assert!(
            matches!(err, DeviceError::Unavailable { .. })
                && err
                    .to_string()
                    .contains(&format!("LibTorch sees {count} CUDA device")),
            "{err}"
        );
        if count > 0 {
            assert_eq!(DeviceSpec::TchCuda(0).check(), Ok(DeviceSpec::TchCuda(0)));
        }
    }

    #[test]
    fn a_missing_cuda_driver_is_an_error_that_names_the_library() {
        let problem = cuda_device_count(&["libchorus-no-such-driver.so"]).unwrap_err();
        assert!(problem.contains("libchorus-no-such-driver.so"), "{problem}");
        // A library that loads but is not the driver.
        let problem = cuda_device_count(&["libc.so.6"]).unwrap_err();
        assert!(problem.contains("has no cuInit"), "{problem}");
    }
}
