//! Making sure the job's image is there, under the configured pull policy.

use bollard::Docker;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;

use crate::config::PullPolicy;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {image} is not present and the pull policy is `never`")]
    NotPresent { image: String },
    #[error("cannot pull image {image}: {reason}")]
    Pull { image: String, reason: String },
    #[error("cannot inspect image {image}: {reason}")]
    Inspect { image: String, reason: String },
}

/// What happened while ensuring an image, for progress lines and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum PullProgress {
    Started,
    Status(String),
    Done,
}

/// Ensures `image` is present; pulls it when the policy says so. Returns whether it pulled.
pub async fn ensure(
    docker: &Docker,
    image: &str,
    policy: PullPolicy,
    mut progress: impl FnMut(PullProgress),
) -> Result<bool, ImageError> {
    let present = match docker.inspect_image(image).await {
        Ok(_) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => false,
        Err(e) => {
            return Err(ImageError::Inspect {
                image: image.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    match (policy, present) {
        (PullPolicy::Never, true) | (PullPolicy::IfNotPresent, true) => return Ok(false),
        (PullPolicy::Never, false) => {
            return Err(ImageError::NotPresent {
                image: image.to_owned(),
            });
        }
        (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => {}
    }
    progress(PullProgress::Started);
    let (name, tag) = split_tag(image);
    let options = CreateImageOptionsBuilder::default()
        .from_image(name)
        .tag(tag)
        .build();
    let mut pull = docker.create_image(Some(options), None, None);
    let mut last_status = String::new();
    while let Some(item) = pull.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(ImageError::Pull {
                        image: image.to_owned(),
                        reason: detail,
                    });
                }
                if let Some(status) = info.status
                    && status != last_status
                {
                    last_status = status.clone();
                    progress(PullProgress::Status(status));
                }
            }
            Err(e) => {
                let reason = match e {
                    bollard::errors::Error::DockerResponseServerError { message, .. } => message,
                    other => other.to_string(),
                };
                return Err(ImageError::Pull {
                    image: image.to_owned(),
                    reason,
                });
            }
        }
    }
    progress(PullProgress::Done);
    Ok(true)
}

/// Splits `repo[:tag][@digest]` into what the pull API wants; a digest goes in the tag slot.
fn split_tag(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    // A `:` after the last `/` is a tag; before it, a registry port.
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], &image[i + 1..]),
        _ => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::split_tag;

    #[test]
    fn tags_ports_and_digests() {
        assert_eq!(split_tag("alpine"), ("alpine", "latest"));
        assert_eq!(split_tag("alpine:3.20"), ("alpine", "3.20"));
        assert_eq!(
            split_tag("localhost:5000/x/y"),
            ("localhost:5000/x/y", "latest")
        );
        assert_eq!(
            split_tag("localhost:5000/x/y:1"),
            ("localhost:5000/x/y", "1")
        );
        assert_eq!(
            split_tag("ghcr.io/a/b@sha256:abc"),
            ("ghcr.io/a/b", "sha256:abc")
        );
    }
}
