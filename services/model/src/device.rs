//! Choosing the burn [`Device`] by name at run time.
//!
//! - `"cpu"` and `"flex"`: burn's pure-Rust flex CPU backend (always built in).
//! - `"cuda"`, `"cuda:N"`: a CUDA GPU, with the `cuda` feature.
//! - `"vulkan"`, `"vulkan:N"`: a GPU through Vulkan (burn's wgpu runtime, SPIR-V kernels), with
//!   the `vulkan` feature: the best GPU Vulkan offers, or the N-th discrete one. Unlike `cuda`,
//!   it builds offline (no LLVM download) and needs only the GPU driver's Vulkan ICD at run time.
//!
//! A GPU name this build cannot use is refused with the feature that would add it. Training
//! wraps the device with `.autodiff()` itself; callers pass the plain device.

use burn::tensor::Device;

/// The device name used when none is given.
pub const DEFAULT_DEVICE: &str = "cpu";

/// A device name that this build cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The name is not one of the known device names.
    #[error("unknown device '{0}': expected 'cpu' (or 'flex'), 'cuda', 'cuda:N', 'vulkan' or 'vulkan:N'")]
    Unknown(String),
    /// The device is built in but this machine cannot provide it.
    #[error("device '{device}' is not available: {reason}")]
    Unavailable { device: String, reason: String },
    /// A GPU device was asked for, but this binary was built without the feature it needs.
    #[error("device '{device}' needs the '{feature}' feature: rebuild with `--features tandem-model/{feature}`")]
    NotBuilt { device: String, feature: &'static str },
}

/// Parses a device name (`cpu`, `flex`, `cuda`, `cuda:N`, `vulkan`, `vulkan:N`;
/// case-insensitive) into a burn device.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    let normalized = name.trim().to_ascii_lowercase();
    let (kind, index) = match normalized.split_once(':') {
        Some((kind, index)) => {
            (kind, Some(index.parse::<usize>().map_err(|_| DeviceError::Unknown(name.to_string()))?))
        }
        None => (normalized.as_str(), None),
    };
    match (kind, index) {
        ("cpu" | "flex", None) => Ok(Device::flex()),
        ("cuda", index) => cuda_device(name, index.unwrap_or(0)),
        ("vulkan", index) => vulkan_device(name, index),
        _ => Err(DeviceError::Unknown(name.to_string())),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(_name: &str, index: usize) -> Result<Device, DeviceError> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(name: &str, _index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt { device: name.to_string(), feature: "cuda" })
}

/// burn panics on first use of a Vulkan device it cannot open, so the GPUs are counted first.
#[cfg(feature = "vulkan")]
fn vulkan_device(name: &str, index: Option<usize>) -> Result<Device, DeviceError> {
    use burn::tensor::DeviceKind;
    let unavailable = |reason: String| DeviceError::Unavailable { device: name.to_string(), reason };
    match (vulkan_adapters(), index) {
        (Some((0, _)), _) => Err(unavailable(
            "Vulkan finds no device (is the GPU driver's Vulkan ICD installed? VK_ICD_FILENAMES can name it)".into(),
        )),
        (Some((_, discrete)), Some(index)) if index >= discrete => {
            Err(unavailable(format!("Vulkan finds {discrete} discrete GPU(s), numbered from 0")))
        }
        _ => Ok(Device::vulkan(index.map_or(DeviceKind::DefaultDevice, DeviceKind::DiscreteGpu))),
    }
}

/// The devices Vulkan offers and how many of them are discrete GPUs; `None` when they cannot
/// be counted right away.
#[cfg(feature = "vulkan")]
fn vulkan_adapters() -> Option<(usize, usize)> {
    use burn::tensor::wgpu::wgpu;
    use std::future::Future;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::VULKAN,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    // Enumerating adapters completes at once on native platforms.
    let mut enumeration = std::pin::pin!(instance.enumerate_adapters(wgpu::Backends::VULKAN));
    let std::task::Poll::Ready(adapters) =
        enumeration.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    else {
        return None;
    };
    let discrete = adapters.iter().filter(|a| a.get_info().device_type == wgpu::DeviceType::DiscreteGpu).count();
    Some((adapters.len(), discrete))
}

#[cfg(not(feature = "vulkan"))]
fn vulkan_device(name: &str, _index: Option<usize>) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt { device: name.to_string(), feature: "vulkan" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_names_parse_and_unknown_names_are_refused() {
        assert!(parse_device("cpu").is_ok());
        assert!(parse_device(" FLEX ").is_ok());
        let err = parse_device("tpu").unwrap_err();
        assert_eq!(err, DeviceError::Unknown("tpu".into()));
        assert!(err.to_string().contains("unknown device 'tpu'"));
        for bad in ["cuda:x", "vulkan:", "cpu:0", "vulkan:-1", "cuda:0:1"] {
            assert_eq!(parse_device(bad).unwrap_err(), DeviceError::Unknown(bad.into()), "{bad}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = parse_device("cuda:1").unwrap_err();
        assert!(err.to_string().contains("--features tandem-model/cuda"), "{err}");
    }

    #[cfg(not(feature = "vulkan"))]
    #[test]
    fn vulkan_without_the_feature_says_how_to_get_it() {
        let err = parse_device("Vulkan").unwrap_err();
        assert_eq!(err, DeviceError::NotBuilt { device: "Vulkan".into(), feature: "vulkan" });
        assert!(err.to_string().contains("--features tandem-model/vulkan"), "{err}");
    }
}
