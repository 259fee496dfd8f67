//! The job image of the tests and of the benchmark (both include this file): Debian's
//! `busybox-static` binary with its applets, plus `gryt-standin.sh` installed as
//! `/usr/local/bin/gryt` (a TEST STAND-IN for the gryt CLI, see that file), imported through
//! bollard as `gryt-agent-test/busybox:<content hash>`, so no registry is needed.

use bollard::Docker;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;

const BUSYBOX: &str = "/bin/busybox";
const STANDIN: &str = include_str!("gryt-standin.sh");
const REPO: &str = "gryt-agent-test/busybox";

/// Imports the image into `docker` (when it is not there yet) and returns its name.
pub async fn import(docker: &Docker) -> Result<String, String> {
    let busybox = std::fs::read(BUSYBOX).map_err(|e| {
        format!("{BUSYBOX} missing ({e}): install Debian's busybox-static (.ci/run does)")
    })?;
    let tag = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        busybox.hash(&mut h);
        STANDIN.hash(&mut h);
        format!("{:x}", h.finish())
    };
    let name = format!("{REPO}:{tag}");
    if docker.inspect_image(&name).await.is_ok() {
        return Ok(name);
    }
    let rootfs = rootfs_tar(&busybox).map_err(|e| format!("test image root filesystem: {e}"))?;
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(REPO)
        .tag(&tag)
        .build();
    let mut import =
        docker.create_image(Some(options), Some(bollard::body_full(rootfs.into())), None);
    while let Some(item) = import.next().await {
        let info = item.map_err(|e| format!("image import failed: {e}"))?;
        if let Some(detail) = info.error_detail {
            return Err(format!("image import failed: {detail:?}"));
        }
    }
    docker
        .inspect_image(&name)
        .await
        .map_err(|e| format!("imported image {name} not found: {e}"))?;
    Ok(name)
}

/// A root filesystem: busybox and a link per applet in /bin, the gryt stand-in, /tmp, /workspace.
fn rootfs_tar(busybox: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for (d, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("workspace", 0o755),
        ("usr", 0o755),
        ("usr/local", 0o755),
        ("usr/local/bin", 0o755),
        ("proc", 0o755),
        ("sys", 0o755),
        ("dev", 0o755),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        tar.append_data(&mut h, d, std::io::empty())?;
    }
    let mut file = |path: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data)
    };
    file("bin/busybox", busybox)?;
    file("usr/local/bin/gryt", STANDIN.as_bytes())?;
    file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\njob:x:1000:1000:job:/tmp:/bin/sh\n",
    )?;
    file("etc/group", b"root:x:0:\njob:x:1000:\n")?;
    let list = std::process::Command::new(BUSYBOX).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet == "busybox" || applet.contains('/') {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    tar.into_inner()
}
