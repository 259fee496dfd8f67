//! Streaming transfers with bounded memory. Uploads take a stream of chunks and send it as one
//! object, or as a multipart upload once it outgrows one part; each part is its own request,
//! retried on its own by the client, and at most [`PARTS_IN_FLIGHT`] parts are held at once.
//! Downloads hand chunks to a bounded channel as they arrive.

use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use object_store::path::Path as ObjectPath;
use object_store::{GetResult, MultipartUpload, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::Store;

/// Parts uploading at the same time.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Size of the chunks producers send.
pub const CHUNK: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Read(io::Error),
    #[error("{0}")]
    Store(object_store::Error),
    #[error("larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
}

/// What an upload wrote.
#[derive(Debug, Clone, Copy)]
pub struct Uploaded {
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Uploads what `chunks` yields to `location`, aborting (nothing left behind) on any error,
/// including a read error a producer sends.
pub async fn upload(
    store: &Store,
    location: &ObjectPath,
    chunks: mpsc::Receiver<io::Result<Bytes>>,
) -> Result<Uploaded, TransferError> {
    let mut multipart: Option<Box<dyn MultipartUpload>> = None;
    let result = upload_inner(store, location, chunks, &mut multipart).await;
    if result.is_err()
        && let Some(mut upload) = multipart
        && let Err(e) = upload.abort().await
    {
        tracing::warn!(error = %e, "cannot abort a failed multipart upload");
    }
    result
}

async fn upload_inner(
    store: &Store,
    location: &ObjectPath,
    mut chunks: mpsc::Receiver<io::Result<Bytes>>,
    multipart: &mut Option<Box<dyn MultipartUpload>>,
) -> Result<Uploaded, TransferError> {
    let part_size = store.part_size();
    let mut buf = BytesMut::new();
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut in_flight = FuturesUnordered::new();
    while let Some(chunk) = chunks.recv().await {
        let chunk = chunk.map_err(TransferError::Read)?;
        hash.update(&chunk);
        size += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
        while buf.len() >= part_size {
            let part = buf.split_to(part_size).freeze();
            if multipart.is_none() {
                let started = store
                    .s3()
                    .put_multipart(location)
                    .await
                    .map_err(TransferError::Store)?;
                *multipart = Some(started);
            }
            let Some(upload) = multipart.as_mut() else {
                unreachable!("started above")
            };
            in_flight.push(upload.put_part(PutPayload::from_bytes(part)));
            while in_flight.len() >= PARTS_IN_FLIGHT {
                if let Some(done) = in_flight.next().await {
                    done.map_err(TransferError::Store)?;
                }
            }
        }
    }
    let rest = buf.freeze();
    match multipart.as_mut() {
        None => {
            store
                .s3()
                .put(location, PutPayload::from_bytes(rest))
                .await
                .map_err(TransferError::Store)?;
        }
        Some(upload) => {
            if !rest.is_empty() {
                in_flight.push(upload.put_part(PutPayload::from_bytes(rest)));
            }
            while let Some(done) = in_flight.next().await {
                done.map_err(TransferError::Store)?;
            }
            upload.complete().await.map_err(TransferError::Store)?;
        }
    }
    Ok(Uploaded {
        size,
        sha256: hash.finalize().into(),
    })
}

/// Opens the object at `location` for reading: `None` when there is no such object (one GET,
/// no HEAD before it); one larger than `limit` bytes is refused before any byte is read.
pub async fn open(
    store: &Store,
    location: &ObjectPath,
    limit: u64,
) -> Result<Option<GetResult>, TransferError> {
    let got = match store.s3().get(location).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(TransferError::Store(e)),
    };
    if got.meta.size > limit {
        return Err(TransferError::TooLarge { limit });
    }
    Ok(Some(got))
}

/// Streams an object [`open`] returned into `sink`, refusing more than `limit` bytes. Stops
/// quietly when the receiver is gone (it failed and says why itself).
pub async fn download(
    got: GetResult,
    sink: mpsc::Sender<Bytes>,
    limit: u64,
) -> Result<u64, TransferError> {
    let mut stream = got.into_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(TransferError::Store)?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(TransferError::TooLarge { limit });
        }
        if sink.send(chunk).await.is_err() {
            break;
        }
    }
    Ok(size)
}

/// A blocking `Write` that sends what is written as chunks to an upload (cache archives).
pub struct ChunkWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::other("the upload stopped"))
    }
}

impl io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A blocking `Read` over chunks a download sends (cache archives).
pub struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChunkReader {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        ChunkReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl io::Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
