//! Choosing the burn [`Device`] by name at run time.
//!
//! `"cpu"` and `"flex"` name burn's pure-Rust flex CPU backend (always built in). `"cuda"` and
//! `"cuda:N"` name a CUDA GPU and are accepted only when this crate is built with the `cuda`
//! feature. Training wraps the device with `.autodiff()` itself; callers pass the plain device.

use burn::tensor::Device;

/// The device name used when none is given.
pub const DEFAULT_DEVICE: &str = "cpu";

/// A device name that this build cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The name is not one of the known device names.
    #[error("unknown device '{0}': expected 'cpu' (or 'flex'), 'cuda' or 'cuda:N'")]
    Unknown(String),
    /// A CUDA device was asked for, but this binary was built without the `cuda` feature.
    #[error("device '{0}' needs CUDA support: rebuild with `--features cuda`")]
    CudaNotBuilt(String),
}

/// Parses a device name (`cpu`, `flex`, `cuda`, `cuda:N`; case-insensitive) into a burn device.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    let normalized = name.trim().to_ascii_lowercase();
    match normalized.as_str() {
        "cpu" | "flex" => Ok(Device::flex()),
        "cuda" => cuda_device(name, 0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => cuda_device(name, index),
            _ => Err(DeviceError::Unknown(name.to_string())),
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(_name: &str, index: usize) -> Result<Device, DeviceError> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(name: &str, _index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::CudaNotBuilt(name.to_string()))
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
        assert!(parse_device("cuda:x").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = parse_device("cuda:1").unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }
}
