//! Choosing where tensors live: the GPU when this build has CUDA and a GPU answers, else the CPU,
//! always with the reason, so the studio and the CLI can say why.

use candle_core::Device;

/// The device picked for a run and why.
#[derive(Debug, Clone)]
pub struct DeviceChoice {
    /// Where tensors will live.
    pub device: Device,
    /// A short name: "cpu" or "cuda:N".
    pub name: String,
    /// Why this device was picked, in a sentence.
    pub reason: String,
}

/// Whether this binary was built with the `cuda` feature.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// Picks the device: CPU when `force_cpu`, else CUDA device 0 if this build has the `cuda`
/// feature and the GPU opens, else CPU with the reason.
pub fn choose_device(force_cpu: bool) -> DeviceChoice {
    let cpu = |reason: String| DeviceChoice {
        device: Device::Cpu,
        name: "cpu".to_string(),
        reason,
    };
    if force_cpu {
        return cpu("the CPU was asked for".to_string());
    }
    if !BUILT_WITH_CUDA {
        return cpu(
            "this build has no CUDA support (build with --features cuda to train on a GPU)"
                .to_string(),
        );
    }
    match Device::new_cuda(0) {
        Ok(device) => DeviceChoice {
            device,
            name: "cuda:0".to_string(),
            reason: "CUDA device 0 opened".to_string(),
        },
        Err(e) => cpu(format!(
            "this build has CUDA support but no GPU could be opened ({e}); using the CPU"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_when_asked_or_without_cuda() {
        let forced = choose_device(true);
        assert!(forced.device.is_cpu());
        assert_eq!(forced.name, "cpu");
        let auto = choose_device(false);
        if !BUILT_WITH_CUDA {
            assert!(auto.device.is_cpu());
            assert!(auto.reason.contains("no CUDA support"), "{}", auto.reason);
        } else {
            assert!(auto.device.is_cuda() || auto.reason.contains("no GPU could be opened"));
        }
    }
}
