//! The peer protocol: length-prefixed frames (a 4-byte big-endian length, then
//! one [`Message`] encoded with postcard) over the TLS stream. Every frame has a
//! size limit and every field is checked when it is read: a bad frame is an error
//! that closes that connection, never a panic.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::content::{ChunkInfo, Hash};
use crate::device::PeerId;
use crate::error::{Error, Result};
use crate::folder::check_relative;
use crate::history::{Entry, Kind};

/// 2: chunks are asked for in batches. 3: a content of several chunks is hashed
/// from its chunk list (`content::content_hash`), so hashes differ from 2's.
pub const VERSION: u32 = 3;
/// Bytes of one frame at most: a chunk (at most 256 KiB) or a batch of entries.
pub const MAX_FRAME: usize = 4 << 20;
/// Chunks per [`Request::ReadChunks`] at most.
pub const MAX_CHUNKS_PER_REQUEST: usize = 256;
/// Bytes of chunks per [`Request::ReadChunks`] at most: the reply fits a frame.
pub const MAX_CHUNK_BYTES_PER_REQUEST: usize = MAX_FRAME / 2;
/// Bytes of chunks this side asks for in one request: each request costs both
/// daemons a few thread wake-ups: 1 MiB rather than 256 KiB cut a tenth of the
/// sending daemon's CPU on a large first sync. A reply stays below the
/// size the daemon's allocator maps apart (`M_MMAP_THRESHOLD`), so receiving it
/// reuses freed memory instead of faulting in fresh pages.
pub const CHUNK_BYTES_PER_BATCH: usize = 1 << 20;
/// Entries per reply to [`Request::ChangesSince`] at most.
pub const MAX_ENTRIES: u32 = 5_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// The first frame each side sends.
    Hello {
        version: u32,
        name: String,
        /// The folders this side shares with the other, and the replica id of
        /// each (the author of the versions it records).
        folders: Vec<(String, [u8; 32])>,
    },
    Request {
        id: u64,
        request: Request,
    },
    Response {
        id: u64,
        response: Response,
    },
    /// The sender's history of `folder` now ends at `seq`: time to ask for it.
    Changed {
        folder: String,
        seq: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    ChangesSince {
        folder: String,
        seq: u64,
        limit: u32,
    },
    ChunksOf {
        folder: String,
        content: [u8; 32],
    },
    /// Several chunks at once (many small files' worth): at most
    /// [`MAX_CHUNKS_PER_REQUEST`], of [`MAX_CHUNK_BYTES_PER_REQUEST`] in all.
    ReadChunks {
        folder: String,
        wanted: Vec<WantedChunk>,
    },
}

/// A chunk of a content the peer announced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WantedChunk {
    /// Where the content was announced: looked at first.
    pub path: String,
    pub content: [u8; 32],
    pub chunk: WireChunk,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Changes(Vec<WireEntry>),
    Chunks(Vec<WireChunk>),
    /// The bytes of each chunk asked for, in order; `None`: not available any
    /// more (the file changed since it was hashed).
    ChunkData(Vec<Option<serde_bytes::ByteBuf>>),
    /// Not allowed or not possible, and why.
    Refused(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WireChunk {
    pub hash: [u8; 32],
    pub offset: u64,
    pub len: u32,
}

impl From<&ChunkInfo> for WireChunk {
    fn from(c: &ChunkInfo) -> Self {
        WireChunk {
            hash: c.hash.0,
            offset: c.offset,
            len: c.len,
        }
    }
}

impl WireChunk {
    pub fn checked(&self) -> Result<ChunkInfo> {
        if self.len == 0 || self.len as usize > MAX_FRAME / 2 {
            return Err(bad(format!("a chunk of {} bytes", self.len)));
        }
        Ok(ChunkInfo {
            hash: Hash(self.hash),
            offset: self.offset,
            len: self.len,
        })
    }
}

/// A history entry as sent: without the sender's local stat fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEntry {
    pub seq: u64,
    pub path: String,
    pub kind: u8,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub hash: Option<[u8; 32]>,
    pub link_target: Option<String>,
    pub peerid: [u8; 32],
    pub author_peerid: [u8; 32],
    pub author_utime_ns: i64,
    pub utime_ns: i64,
}

impl From<&Entry> for WireEntry {
    fn from(e: &Entry) -> Self {
        WireEntry {
            seq: e.seq,
            path: e.path.clone(),
            kind: e.kind.code() as u8,
            size: e.size,
            mtime_ns: e.mtime_ns,
            mode: e.mode,
            hash: e.hash.map(|h| h.0),
            link_target: e.link_target.clone(),
            peerid: e.peerid.0,
            author_peerid: e.author_peerid.0,
            author_utime_ns: e.author_utime_ns,
            utime_ns: e.utime_ns,
        }
    }
}

impl WireEntry {
    /// The entry, if every field is acceptable.
    pub fn checked(self) -> Result<Entry> {
        check_relative(&self.path).map_err(|e| bad(e.to_string()))?;
        let kind = Kind::from_code(i64::from(self.kind))
            .ok_or_else(|| bad(format!("kind {}", self.kind)))?;
        if self.mode > 0o7777 {
            return Err(bad(format!("mode {:o}", self.mode)));
        }
        if let Some(target) = &self.link_target
            && (target.is_empty() || target.contains('\0'))
        {
            return Err(bad("a symlink target that is empty or has a NUL".into()));
        }
        Ok(Entry {
            seq: self.seq,
            path: self.path,
            kind,
            size: self.size,
            mtime_ns: self.mtime_ns,
            mode: self.mode,
            inode: 0,
            ctime_ns: 0,
            hash: self.hash.map(Hash),
            link_target: self.link_target,
            peerid: PeerId(self.peerid),
            author_peerid: PeerId(self.author_peerid),
            author_utime_ns: self.author_utime_ns,
            utime_ns: self.utime_ns,
        })
    }
}

fn bad(reason: String) -> Error {
    Error::Protocol(reason)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(out: &mut W, message: &Message) -> Result<()> {
    write_frame_unflushed(out, message).await?;
    out.flush()
        .await
        .map_err(|e| Error::Peer(format!("cannot send: {e}")))
}

/// Writes one frame without flushing: a sender with several frames queued
/// flushes once, so they leave in one TLS record and one system call.
pub async fn write_frame_unflushed<W: AsyncWrite + Unpin>(
    out: &mut W,
    message: &Message,
) -> Result<()> {
    let cannot_encode = |e| bad(format!("cannot encode: {e}"));
    // Sized first, so chunk data is copied once, into a frame that never grows.
    let len = postcard::experimental::serialized_size(message).map_err(cannot_encode)?;
    if len > MAX_FRAME {
        return Err(bad(format!("a frame of {len} bytes to send")));
    }
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    let frame =
        postcard::serialize_with_flavor(message, FrameBuffer(frame)).map_err(cannot_encode)?;
    out.write_all(&frame)
        .await
        .map_err(|e| Error::Peer(format!("cannot send: {e}")))
}

/// A frame being encoded. Unlike postcard's `Extend` flavor, it copies byte
/// strings (chunk data) whole, not byte by byte.
struct FrameBuffer(Vec<u8>);

impl postcard::ser_flavors::Flavor for FrameBuffer {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Reads one frame; `None` at a clean end of the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(input: &mut R) -> Result<Option<Message>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::Peer(format!("cannot receive: {e}"))),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(bad(format!("a frame of {len} bytes (at most {MAX_FRAME})")));
    }
    // Read into capacity never zeroed: every byte is overwritten anyway.
    let mut body = Vec::with_capacity(len);
    let read = input
        .take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(|e| Error::Peer(format!("cannot receive: {e}")))?;
    if read < len {
        return Err(Error::Peer(
            "cannot receive: the stream ended in a frame".into(),
        ));
    }
    let message: Message =
        postcard::from_bytes(&body).map_err(|e| bad(format!("a malformed frame: {e}")))?;
    check(&message)?;
    Ok(Some(message))
}

/// `wanted` cut into requests within the limits of [`Request::ReadChunks`], in order.
pub fn chunk_batches(wanted: Vec<WantedChunk>) -> Vec<Vec<WantedChunk>> {
    let mut batches: Vec<Vec<WantedChunk>> = Vec::new();
    let mut bytes = 0;
    for item in wanted {
        let len = item.chunk.len as usize;
        match batches.last_mut() {
            Some(batch)
                if batch.len() < MAX_CHUNKS_PER_REQUEST && bytes + len <= CHUNK_BYTES_PER_BATCH =>
            {
                bytes += len;
                batch.push(item);
            }
            _ => {
                bytes = len;
                batches.push(vec![item]);
            }
        }
    }
    batches
}

/// The checks that do not depend on the receiver's state.
fn check(message: &Message) -> Result<()> {
    let folder_ok = |f: &str| crate::shares::check_folder_id(f).map_err(|e| bad(e.to_string()));
    match message {
        Message::Hello { name, folders, .. } => {
            if name.len() > 256 || folders.len() > 10_000 {
                return Err(bad("an oversized hello".into()));
            }
            folders.iter().try_for_each(|(f, _)| folder_ok(f))
        }
        Message::Changed { folder, .. } => folder_ok(folder),
        Message::Request { request, .. } => match request {
            Request::ChangesSince { folder, .. } | Request::ChunksOf { folder, .. } => {
                folder_ok(folder)
            }
            Request::ReadChunks { folder, wanted } => {
                folder_ok(folder)?;
                if wanted.len() > MAX_CHUNKS_PER_REQUEST {
                    return Err(bad(format!("{} chunks in one request", wanted.len())));
                }
                let mut bytes = 0;
                for WantedChunk { path, chunk, .. } in wanted {
                    check_relative(path).map_err(|e| bad(e.to_string()))?;
                    bytes += chunk.checked()?.len as usize;
                }
                if bytes > MAX_CHUNK_BYTES_PER_REQUEST {
                    return Err(bad(format!("{bytes} bytes of chunks in one request")));
                }
                Ok(())
            }
        },
        Message::Response { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> WireEntry {
        WireEntry {
            seq: 1,
            path: path.into(),
            kind: Kind::File.code() as u8,
            size: 3,
            mtime_ns: 1,
            mode: 0o644,
            hash: Some([7; 32]),
            link_target: None,
            peerid: [1; 32],
            author_peerid: [1; 32],
            author_utime_ns: 1,
            utime_ns: 1,
        }
    }

    fn wanted(path: &str, len: u32) -> WantedChunk {
        WantedChunk {
            path: path.into(),
            content: [0; 32],
            chunk: WireChunk {
                hash: [0; 32],
                offset: 0,
                len,
            },
        }
    }

    async fn round_trip(message: &Message) -> Result<Option<Message>> {
        let mut wire = Vec::new();
        write_frame(&mut wire, message).await?;
        read_frame(&mut &wire[..]).await
    }

    #[tokio::test]
    async fn messages_survive_the_wire() {
        let messages = [
            Message::Hello {
                version: VERSION,
                name: "laptop".into(),
                folders: vec![("music".into(), [3; 32])],
            },
            Message::Response {
                id: 9,
                response: Response::Changes(vec![entry("a/b.txt")]),
            },
            Message::Response {
                id: 10,
                response: Response::ChunkData(vec![Some(vec![1, 2, 3].into()), None]),
            },
        ];
        for message in messages {
            assert_eq!(round_trip(&message).await.unwrap(), Some(message));
        }
        assert_eq!(read_frame(&mut &[][..]).await.unwrap(), None);
    }

    #[tokio::test]
    async fn garbage_oversized_frames_and_bad_paths_are_errors() {
        let garbage = [0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut &garbage[..]).await,
            Err(Error::Protocol(_))
        ));
        let oversized = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = read_frame(&mut &oversized[..]).await.unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        let truncated = [0, 0, 0, 9, 1];
        assert!(read_frame(&mut &truncated[..]).await.is_err());
        for path in [
            "../etc/passwd",
            "/abs",
            "a/../b",
            "a\0b",
            ".latus/history.db",
        ] {
            assert!(entry(path).checked().is_err(), "{path:?}");
            let request = Message::Request {
                id: 1,
                request: Request::ReadChunks {
                    folder: "f".into(),
                    wanted: vec![wanted(path, 1)],
                },
            };
            assert!(round_trip(&request).await.is_err(), "{path:?}");
        }
        let bad_folder = Message::Changed {
            folder: "../x".into(),
            seq: 1,
        };
        assert!(round_trip(&bad_folder).await.is_err());
        assert!(entry("ok/path").checked().is_ok());
    }

    #[tokio::test]
    async fn chunk_requests_stay_within_their_limits() {
        let request = |wanted| Message::Request {
            id: 1,
            request: Request::ReadChunks {
                folder: "f".into(),
                wanted,
            },
        };
        let most = vec![wanted("a", 8); MAX_CHUNKS_PER_REQUEST];
        assert!(round_trip(&request(most.clone())).await.is_ok());
        let too_many = vec![wanted("a", 8); MAX_CHUNKS_PER_REQUEST + 1];
        let err = round_trip(&request(too_many)).await.unwrap_err();
        assert!(err.to_string().contains("257 chunks"), "{err}");
        let too_big = vec![wanted("a", (MAX_CHUNK_BYTES_PER_REQUEST / 2 + 1) as u32); 2];
        let err = round_trip(&request(too_big)).await.unwrap_err();
        assert!(err.to_string().contains("bytes of chunks"), "{err}");

        // Batches cut by count and by bytes, in order, each within the limits.
        let len = (CHUNK_BYTES_PER_BATCH / 3) as u32;
        let mut wanted_all = most;
        wanted_all.extend((0..4).map(|i| wanted(&format!("big{i}"), len)));
        let batches = chunk_batches(wanted_all.clone());
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_CHUNKS_PER_REQUEST, 3, 1]);
        assert_eq!(batches.concat(), wanted_all);
        for batch in batches {
            assert!(round_trip(&request(batch)).await.is_ok());
        }
    }
}
