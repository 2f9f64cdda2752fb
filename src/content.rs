//! File content: content-defined chunking (FastCDC) and BLAKE3 hashes.
//!
//! Each chunk has the BLAKE3 of its bytes. A file's hash is the BLAKE3 of its chunk
//! list (see [`content_hash`]), so a file is hashed once, chunk by chunk, and a
//! receiver that verified every chunk checks the whole without reading it again.
//! Chunk boundaries depend only on content, so an insertion moves only the chunks
//! around it.

mod cdc;

use std::fmt;
use std::io::{self, Read};

use cdc::{Cut, Cutter};

pub const MIN_CHUNK: usize = 16 * 1024;
pub const AVG_CHUNK: usize = 64 * 1024;
pub const MAX_CHUNK: usize = 256 * 1024;
/// Read size: several maximal chunks, so every fill emits chunks; files up to this
/// size are read in one go.
const READ_BUFFER: usize = 512 * 1024;

/// A BLAKE3 hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn of(bytes: &[u8]) -> Self {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Hash(bytes.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// The first 12 hex digits, for listings.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One chunk of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    pub hash: Hash,
    pub offset: u64,
    pub len: u32,
}

/// Domain of multi-chunk content hashes: no list of chunk hashes hashes to what
/// some one-chunk content (the same bytes) hashes to.
const CHUNK_LIST_CONTEXT: &str = "latus 2026-11-29 file content from its chunk hashes";

/// The hash of the content cut into `chunks` (in order, covering it): the chunk's
/// own hash for a content of one chunk, BLAKE3 of nothing for an empty one, else
/// BLAKE3 (in its key-derivation mode, a domain of its own) of the chunk hashes.
/// Chunk hashes fix their bytes, so this fixes the whole content as BLAKE3 of the
/// bytes would.
pub fn content_hash(chunks: &[ChunkInfo]) -> Hash {
    match chunks {
        [] => Hash::of(b""),
        [only] => only.hash,
        _ => chunk_list_hash(chunks.iter().map(|chunk| chunk.hash)),
    }
}

/// The hash of a content of several chunks, from their hashes in order.
pub fn chunk_list_hash(chunk_hashes: impl IntoIterator<Item = Hash>) -> Hash {
    let mut list = blake3::Hasher::new_derive_key(CHUNK_LIST_CONTEXT);
    for hash in chunk_hashes {
        list.update(&hash.0);
    }
    Hash(*list.finalize().as_bytes())
}

/// What hashing a file's content gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashedContent {
    pub hash: Hash,
    pub size: u64,
    pub chunks: Vec<ChunkInfo>,
}

/// Chunks and hashes content; keeps its buffer between files so hashing many small
/// files allocates nothing per file.
pub struct ContentHasher {
    buf: Vec<u8>,
}

impl Default for ContentHasher {
    fn default() -> Self {
        ContentHasher {
            buf: vec![0; READ_BUFFER],
        }
    }
}

impl ContentHasher {
    /// Reads `source` to its end. `on_read` is told the size of every read (for
    /// progress and throttling).
    pub fn hash_reader(
        &mut self,
        source: &mut impl Read,
        mut on_read: impl FnMut(usize),
    ) -> io::Result<HashedContent> {
        let mut chunks = Vec::new();
        let mut filled = 0;
        let mut buf_offset = 0u64; // file offset of buf[0]
        let mut eof = false;
        // Where the chunk at the start of the buffer may end, as far as read.
        let mut known_free = 0;
        loop {
            while filled < self.buf.len() && !eof {
                match source.read(&mut self.buf[filled..]) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        filled += n;
                        on_read(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let consumed;
            (consumed, known_free) = cut_chunks(
                &self.buf[..filled],
                buf_offset,
                eof,
                known_free,
                &mut chunks,
            );
            if eof {
                return Ok(HashedContent {
                    hash: content_hash(&chunks),
                    size: buf_offset + filled as u64,
                    chunks,
                });
            }
            self.buf.copy_within(consumed..filled, 0);
            filled -= consumed;
            buf_offset += consumed as u64;
        }
    }
}

/// Cuts `data` (at file offset `base`) into chunks and hashes them; returns how many
/// bytes were cut, and how far the rest is known to hold no cut. Unless the file
/// ends with `data`, the last chunk may go on past it: it is left for the next fill.
fn cut_chunks(
    data: &[u8],
    base: u64,
    eof: bool,
    mut known_free: usize,
    chunks: &mut Vec<ChunkInfo>,
) -> (usize, usize) {
    let mut consumed = 0;
    while consumed < data.len() {
        match Cutter::standard().cut(&data[consumed..], eof, known_free) {
            Cut::At(len) => {
                let end = consumed + len;
                chunks.push(ChunkInfo {
                    hash: Hash::of(&data[consumed..end]),
                    offset: base + consumed as u64,
                    len: len as u32,
                });
                consumed = end;
                known_free = 0;
            }
            Cut::NoneBefore(free) => return (consumed, free),
        }
    }
    (consumed, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(super) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A reader that returns at most `step` bytes per call, like a slow pipe.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn check_invariants(data: &[u8], hashed: &HashedContent) {
        assert_eq!(hashed.size, data.len() as u64);
        assert_eq!(hashed.hash, content_hash(&hashed.chunks));
        let mut next = 0u64;
        for (i, c) in hashed.chunks.iter().enumerate() {
            assert_eq!(c.offset, next, "chunks are contiguous");
            let bytes = &data[c.offset as usize..][..c.len as usize];
            assert_eq!(c.hash, Hash::of(bytes));
            assert!(c.len as usize <= MAX_CHUNK);
            if i + 1 < hashed.chunks.len() {
                assert!(c.len as usize >= MIN_CHUNK);
            }
            next += c.len as u64;
        }
        assert_eq!(next, data.len() as u64, "chunks cover the file");
    }

    #[test]
    fn empty_and_single_chunk_files() {
        let mut hasher = ContentHasher::default();
        let empty = hasher.hash_reader(&mut &b""[..], |_| {}).unwrap();
        assert_eq!(empty.hash, Hash::of(b""));
        assert!(empty.chunks.is_empty());
        let small = pseudo_random(5000, 1);
        let hashed = hasher.hash_reader(&mut &small[..], |_| {}).unwrap();
        check_invariants(&small, &hashed);
        assert_eq!(hashed.chunks.len(), 1);
        // The merger relies on this: it asks no chunk list for such a content.
        for seed in 0..20 {
            let at_most_min = pseudo_random(MIN_CHUNK, seed);
            let hashed = hasher.hash_reader(&mut &at_most_min[..], |_| {}).unwrap();
            assert_eq!(hashed.chunks.len(), 1);
            assert_eq!(hashed.hash, hashed.chunks[0].hash);
        }
    }

    #[test]
    fn a_chunk_list_hashes_apart_from_any_content_of_one_chunk() {
        let data = pseudo_random(1 << 20, 3);
        let hashed = ContentHasher::default()
            .hash_reader(&mut &data[..], |_| {})
            .unwrap();
        assert!(hashed.chunks.len() > 2);
        // The chunk hashes side by side are a content of one chunk (a few KiB).
        let listed: Vec<u8> = hashed.chunks.iter().flat_map(|c| c.hash.0).collect();
        assert_ne!(hashed.hash, Hash::of(&listed));
        assert_ne!(hashed.hash, Hash::of(&data));
        let mut reordered = hashed.chunks.clone();
        reordered.swap(0, 1);
        assert_ne!(content_hash(&reordered), hashed.hash);
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() {
        let data = pseudo_random(4 << 20, 7);
        let mut edited = data.clone();
        edited.splice(2 << 20..2 << 20, b"inserted bytes".iter().copied());
        let mut hasher = ContentHasher::default();
        let before = hasher.hash_reader(&mut &data[..], |_| {}).unwrap();
        let after = hasher.hash_reader(&mut &edited[..], |_| {}).unwrap();
        let old: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
        let changed = after
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.hash))
            .count();
        assert!(before.chunks.len() > 30);
        assert!(changed <= 2, "{changed} chunks changed");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Chunking does not depend on how the reader splits its reads.
        #[test]
        fn chunks_are_independent_of_read_sizes(len in 0usize..3_000_000, seed: u64, step in 1usize..400_000) {
            let data = pseudo_random(len, seed);
            let mut hasher = ContentHasher::default();
            let whole = hasher.hash_reader(&mut &data[..], |_| {}).unwrap();
            let trickled = hasher.hash_reader(&mut Trickle(&data, step), |_| {}).unwrap();
            check_invariants(&data, &whole);
            // Streaming through a bounded buffer cuts exactly where one pass over the whole does.
            let one_pass: Vec<u64> = fastcdc::v2020::FastCDC::new(&data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).map(|c| c.offset as u64).collect();
            let streamed: Vec<u64> = whole.chunks.iter().map(|c| c.offset).collect();
            prop_assert_eq!(one_pass, streamed);
            prop_assert_eq!(whole, trickled);
        }
    }
}
