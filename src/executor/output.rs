//! A job's output: every byte passes the masker before anyone (observer, result) sees it, is
//! kept as a bounded tail for the result, and, for a gryt pipeline, is followed for the report.

use super::capture::TailBuffer;
use super::container::MarkId;
use super::container::OutputStream;
use super::observer::JobObserver;
use super::resume::{PrefaceLine, Resume, now_unix_ms};
use crate::pipeline::gryt_report::{ErrorLineCapture, ReportCapture};
use crate::secrets::mask::{Masker, StreamMasker};
use crate::wire::{ArtifactResult, ServiceResult, StepResult};

/// The mutable state of one run: captured output, steps so far, OOM, and the masking that every
/// byte of output passes through before anyone (observer or result) sees it.
pub(super) struct Run<'a> {
    pub observer: &'a dyn JobObserver,
    pub masker: Masker,
    stdout_mask: StreamMasker,
    stderr_mask: StreamMasker,
    pub stdout: TailBuffer,
    pub stderr: TailBuffer,
    /// For a gryt pipeline: its report and load error, followed over the whole output (the
    /// tails above may have dropped them).
    pub gryt: Option<(ReportCapture, ErrorLineCapture)>,
    pub steps: Vec<StepResult>,
    pub oom_killed: bool,
    /// The artifacts uploaded after the steps (`crate::store`), for the result.
    pub artifacts: Vec<ArtifactResult>,
    /// What became of the job's services (`services`), for the result.
    pub services: Vec<ServiceResult>,
    /// What an agent restarted under the job needs (`resume.rs`), from its container's start.
    pub progress: Option<Resume>,
    /// The agent's own output lines before the container started, for `progress`.
    preface: Vec<PrefaceLine>,
}

impl<'a> Run<'a> {
    /// A run whose output is masked with the agent's own secrets until the plan knows them all.
    pub fn new(observer: &'a dyn JobObserver, masker: Masker, cap: usize) -> Self {
        Run {
            observer,
            stdout_mask: masker.stream(),
            stderr_mask: masker.stream(),
            masker,
            stdout: TailBuffer::new(cap),
            stderr: TailBuffer::new(cap),
            gryt: None,
            steps: Vec::new(),
            oom_killed: false,
            artifacts: Vec::new(),
            services: Vec::new(),
            progress: None,
            preface: Vec::new(),
        }
    }

    /// A line of the agent's own (cache restores and artifact uploads say how they went), as
    /// output: before the container starts it is also kept for `progress` (masked, as it goes
    /// to disk), since the container's log will not hold it.
    pub fn agent_line(&mut self, stream: OutputStream, text: &str) {
        if self.progress.is_none() {
            self.preface.push(PrefaceLine {
                stderr: stream == OutputStream::Stderr,
                text: self.masker.mask_str(text),
            });
        }
        self.output(stream, text.as_bytes());
    }

    /// Starts keeping `resume` (the container has started) and hands it to the observer.
    pub async fn begin_progress(&mut self, mut resume: Resume) {
        resume.preface = std::mem::take(&mut self.preface);
        self.progress = Some(resume);
        self.save_progress().await;
    }

    /// A command with end marks `mark` is about to start.
    pub async fn command_starting(&mut self, mark: &MarkId) {
        if let Some(resume) = &mut self.progress {
            resume.commands.push(mark.clone());
            resume.running_since_unix_ms = Some(now_unix_ms());
        }
        self.save_progress().await;
    }

    /// The running command's step result is in `steps`.
    pub async fn command_finished(&mut self) {
        if let Some(resume) = &mut self.progress {
            resume.steps.clone_from(&self.steps);
            resume.running_since_unix_ms = None;
        }
        self.save_progress().await;
    }

    async fn save_progress(&self) {
        if let Some(resume) = &self.progress {
            self.observer.progress(resume).await;
        }
    }

    /// Follows a gryt pipeline's report and load error over the whole output.
    pub fn follow_gryt_report(&mut self) {
        self.gryt = Some(Default::default());
    }

    pub fn output(&mut self, stream: OutputStream, data: &[u8]) {
        let masked = match stream {
            OutputStream::Stdout => self.stdout_mask.push(data),
            OutputStream::Stderr => self.stderr_mask.push(data),
        };
        self.emit(stream, &masked);
    }

    fn emit(&mut self, stream: OutputStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match stream {
            OutputStream::Stdout => self.stdout.push(data),
            OutputStream::Stderr => self.stderr.push(data),
        }
        if let Some((report, errors)) = &mut self.gryt {
            match stream {
                OutputStream::Stdout => report.push(data),
                OutputStream::Stderr => errors.push(data),
            }
        }
        self.observer.output(stream, data);
    }

    /// Releases what the maskers held back in case it was the start of a secret.
    pub fn flush_masks(&mut self) {
        let out = self.stdout_mask.finish();
        self.emit(OutputStream::Stdout, &out);
        let err = self.stderr_mask.finish();
        self.emit(OutputStream::Stderr, &err);
    }

    /// Masks the secrets known so far (the token is only known once decrypted).
    pub fn set_masker(&mut self, masker: Masker) {
        self.stdout_mask = masker.stream();
        self.stderr_mask = masker.stream();
        self.masker = masker;
    }
}
