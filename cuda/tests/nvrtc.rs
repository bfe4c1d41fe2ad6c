//! Every kernel source compiles with NVRTC and assembles with ptxas for the
//! GPUs the device targets, without a GPU. The toolchain comes from the PyPI
//! wheels `scripts/setup.sh --cuda-toolchain` installs (or `TANDEM_NVRTC_LIB`
//! and `TANDEM_PTXAS`); the test fails when it is absent.

use std::path::PathBuf;
use std::process::Command;

use tandem_cuda::{nvrtc_present, SOURCES};

/// Set in the re-run of this test with NVRTC on the library path.
const RERUN: &str = "TANDEM_NVRTC_RERUN";

const TARGETS: [(&str, &str); 2] = [("compute_80", "sm_80"), ("compute_90", "sm_90")];

/// A toolchain path: `env` if set, else `rel` inside the Python package `module`.
fn toolchain_path(env: &str, module: &str, rel: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let script = format!("import {module} as m; print(list(m.__path__)[0])");
    let found = Command::new("python3").args(["-c", &script]).output();
    match found {
        Ok(out) if out.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(rel)
        }
        _ => panic!(
            "the CUDA toolchain is not installed: no Python package {module} and no {env}; \
             run scripts/setup.sh --cuda-toolchain"
        ),
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_present() {
        assert!(
            std::env::var_os(RERUN).is_none(),
            "libnvrtc.so.12 does not load even from the toolchain's directory"
        );
        // The library path is read at process start: run this test again with it.
        let lib = toolchain_path("TANDEM_NVRTC_LIB", "nvidia.cuda_nvrtc", "lib");
        let mut path = lib.into_os_string();
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            path.push(":");
            path.push(old);
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let status = Command::new(exe)
            .args([
                "--exact",
                "every_kernel_compiles_for_sm80_and_sm90",
                "--nocapture",
            ])
            .env("LD_LIBRARY_PATH", path)
            .env(RERUN, "1")
            .status()
            .expect("re-running the test");
        assert!(status.success(), "the NVRTC compile failed (see above)");
        return;
    }
    let ptxas = toolchain_path("TANDEM_PTXAS", "nvidia.cuda_nvcc", "bin/ptxas");
    let dir = std::env::temp_dir().join(format!("tandem-nvrtc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    for source in SOURCES {
        for (arch, sm) in TARGETS {
            let ptx = source
                .compile(arch)
                .unwrap_or_else(|e| panic!("{e}"))
                .to_src();
            for kernel in source.kernels {
                assert!(
                    ptx.contains(&format!(".entry {kernel}(")),
                    "{}.cu for {arch} lacks kernel {kernel}",
                    source.name
                );
            }
            let file = dir.join(format!("{}-{arch}.ptx", source.name));
            std::fs::write(&file, ptx).expect("writing the PTX");
            let out = Command::new(&ptxas)
                .arg(format!("-arch={sm}"))
                .arg(&file)
                .arg("-o")
                .arg(dir.join(format!("{}-{sm}.cubin", source.name)))
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
            assert!(
                out.status.success(),
                "ptxas -arch={sm} rejects {}.cu: {}",
                source.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
