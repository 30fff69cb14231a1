//! Where a span's blocks run: the CPU, an NVIDIA GPU (built with `--features cuda`) or
//! an Apple GPU (`--features metal`).
//!
//! On a GPU the weights, the KV caches and the block math stay on the device; hidden
//! states cross to the host only to go on the wire. GGUF weights stay quantised and use
//! candle's GPU quantised kernels (our packed CPU kernels are for the CPU only);
//! safetensors weights keep their 16-bit type and the blocks compute in it
//! ([`compute_dtype`]).

use std::str::FromStr;

use candle_core::{DType, Device};

use crate::{Result, ShardError};

/// A device as named on the command line: `auto`, `cpu`, `cuda[:N]` or `metal[:N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best device present: a CUDA GPU, else a Metal GPU, else the CPU.
    #[default]
    Auto,
    /// The CPU (our own quantised kernels).
    Cpu,
    /// NVIDIA GPU number N.
    Cuda(usize),
    /// Apple GPU number N.
    Metal(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let (kind, n) = match s.split_once(':') {
            Some((k, n)) => (
                k,
                n.parse::<usize>()
                    .map_err(|_| format!("`{n}` is not a device number"))?,
            ),
            None => (s, 0),
        };
        match kind {
            "auto" if !s.contains(':') => Ok(DeviceChoice::Auto),
            "cpu" if !s.contains(':') => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(n)),
            "metal" => Ok(DeviceChoice::Metal(n)),
            _ => Err(format!(
                "unknown device `{s}`: use auto, cpu, cuda, cuda:N, metal or metal:N"
            )),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

/// Which GPU backends this build has.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "metal") {
        v.push("metal");
    }
    v
}

fn not_built(backend: &str) -> ShardError {
    ShardError::Device(format!(
        "this shoal was built without {backend} support: rebuild with `cargo build --release --features {backend}` (README, \"GPUs\")"
    ))
}

/// Opens the chosen device. `Auto` falls back to the CPU when no GPU backend is built in
/// or none answers.
pub fn open(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) if cfg!(feature = "cuda") => Device::new_cuda(n)
            .map_err(|e| ShardError::Device(format!("cannot open CUDA device {n}: {e}"))),
        DeviceChoice::Cuda(_) => Err(not_built("cuda")),
        DeviceChoice::Metal(n) if cfg!(feature = "metal") => Device::new_metal(n)
            .map_err(|e| ShardError::Device(format!("cannot open Metal device {n}: {e}"))),
        DeviceChoice::Metal(_) => Err(not_built("metal")),
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                match Device::new_cuda(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => tracing::info!("no CUDA device ({e}); trying others"),
                }
            }
            if cfg!(feature = "metal") {
                match Device::new_metal(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => tracing::info!("no Metal device ({e}); using the CPU"),
                }
            }
            Ok(Device::Cpu)
        }
    }
}

/// A short name of a device for logs: `cpu`, `cuda:0`, `metal:0`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => match device.location() {
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            _ => "metal".into(),
        },
    }
}

/// Free and total memory of a GPU, in bytes, where the backend can tell; `None` for the
/// CPU (read /proc/meminfo instead) and for backends that cannot.
pub fn gpu_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64));
    }
    let _ = device;
    None
}

/// Bytes per second `device` reads from its own memory, measured: the bound on decode
/// speed is this divided by the weight bytes a token reads. On the CPU, a sum over
/// 512 MiB by every thread of the math pool (best of three); on a GPU, a 512 MiB
/// element-wise pass or copy, counting bytes read and written (best of five).
pub fn read_bandwidth(device: &Device) -> Result<f64> {
    let mut best = 0.0f64;
    match device {
        Device::Cpu => {
            use rayon::prelude::*;
            // Integer sums vectorise (a float sum is one dependent add at a time and
            // would measure the adder, not the memory).
            let data = vec![1u64; 64 << 20];
            for _ in 0..3 {
                let t = std::time::Instant::now();
                let total: u64 = crate::kernels::on_pool(|| {
                    data.par_chunks(1 << 16)
                        .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                        .reduce(|| 0, u64::wrapping_add)
                });
                let secs = t.elapsed().as_secs_f64();
                std::hint::black_box(total);
                best = best.max((data.len() * 8) as f64 / secs.max(1e-9));
            }
        }
        _ => {
            // Not a reduction: candle's sum ran at 41 GB/s on an H100 whose memory
            // PyTorch reads at 2.9 TB/s. An element-wise pass (read 512 MiB, write
            // 512 MiB) and a device copy run at the memory's speed; both bytes read and
            // bytes written count, as they share the memory's bandwidth.
            let n = 128usize << 20;
            let t = candle_core::Tensor::ones(n, DType::F32, device)?;
            device.synchronize()?;
            for round in 0..6 {
                let started = std::time::Instant::now();
                let y = if round % 2 == 0 {
                    t.affine(1.0, 0.0)?
                } else {
                    t.copy()?
                };
                device.synchronize()?;
                let secs = started.elapsed().as_secs_f64();
                std::hint::black_box(y);
                // The first round pays for allocating the output.
                if round > 0 {
                    best = best.max((2 * n * 4) as f64 / secs.max(1e-9));
                }
            }
        }
    }
    Ok(best)
}

/// The type blocks compute in on `device` for weights stored as `stored`: f32 on the CPU
/// (candle has no fast 16-bit CPU kernels, and f32 keeps a span equal to the
/// one-process result); on a GPU a 16-bit checkpoint keeps its type (half the memory and
/// bandwidth of f32), anything else computes in f32.
pub fn compute_dtype(device: &Device, stored: DType) -> DType {
    match (device, stored) {
        (Device::Cpu, _) => DType::F32,
        (_, DType::BF16) | (_, DType::F16) => stored,
        _ => DType::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        for (s, d) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
            ("metal:1", DeviceChoice::Metal(1)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>(), Ok(d));
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        for bad in ["tpu", "cuda:x", "cpu:1", ""] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_opens_and_missing_backends_say_how_to_get_them() {
        assert!(open(DeviceChoice::Cpu).expect("cpu").is_cpu());
        if !cfg!(feature = "cuda") {
            let e = open(DeviceChoice::Cuda(0))
                .expect_err("no cuda")
                .to_string();
            assert!(e.contains("--features cuda"), "{e}");
            // Auto falls back to the CPU.
            assert!(open(DeviceChoice::Auto).expect("auto").is_cpu());
        }
        assert_eq!(describe(&Device::Cpu), "cpu");
        assert_eq!(gpu_memory(&Device::Cpu), None);
    }

    #[test]
    fn the_cpu_reads_at_a_plausible_speed() {
        let bw = read_bandwidth(&Device::Cpu).expect("measured");
        eprintln!("CPU reads {:.1} GB/s", bw / 1e9);
        // Anything from an old laptop (a few GB/s) to a big server (hundreds).
        assert!(bw > 5e8 && bw < 2e12, "{bw} bytes/s");
    }

    #[test]
    fn sixteen_bit_checkpoints_keep_their_type_on_gpus_only() {
        assert_eq!(compute_dtype(&Device::Cpu, DType::BF16), DType::F32);
        assert_eq!(compute_dtype(&Device::Cpu, DType::F32), DType::F32);
    }
}
