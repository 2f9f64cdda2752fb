//! FastCDC 2020 cut points, the same as the `fastcdc` crate's `FastCDC::new`
//! (normalisation level 1, its gear table and masks) finds, found faster: the
//! crate's loop is bound by the latency of one rolling hash, so this one rolls
//! four at once over four stretches of the data, and resumes where a buffer
//! ended instead of hashing its tail again.
//!
//! A gear hash at position `i` is `Σ gear[byte i-j] << j` over the bytes hashed
//! so far (from `min` into the chunk), so 64 bytes before any position give its
//! exact value: each stretch starts from those.

use std::sync::OnceLock;

use fastcdc::v2020::{Normalization, get_gear_with_seed, select_masks};

use super::{AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};

/// Hashes rolled side by side.
const LANES: usize = 4;
/// Bytes each of them rolls over per round: all stop at the first cut any
/// finds, so this bounds the work spent past a cut.
const SPAN: usize = 2048;
/// Bytes that fix a gear hash: older ones are shifted out of its 64 bits.
const WINDOW: usize = 64;

pub(crate) struct Cutter {
    gear: [u64; 256],
    /// Below the average size: the stricter mask.
    mask_s: u64,
    /// From the average size on.
    mask_l: u64,
    min: usize,
    avg: usize,
    max: usize,
}

/// Where a chunk ends, as far as the data at hand tells.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// The chunk is this long.
    At(usize),
    /// The data at hand has no cut before this position (from the chunk's
    /// start); the chunk may go on past it.
    NoneBefore(usize),
}

impl Cutter {
    /// The cutter of Latus's chunk sizes.
    pub(crate) fn standard() -> &'static Cutter {
        static CUTTER: OnceLock<Cutter> = OnceLock::new();
        CUTTER.get_or_init(|| {
            let (mask_s, mask_l) = select_masks(AVG_CHUNK, Normalization::Level1);
            Cutter::new(MIN_CHUNK, AVG_CHUNK, MAX_CHUNK, mask_s, mask_l)
        })
    }

    fn new(min: usize, avg: usize, max: usize, mask_s: u64, mask_l: u64) -> Cutter {
        let (gear, _) = get_gear_with_seed(0);
        let mut table = [0; 256];
        table.copy_from_slice(&gear);
        Cutter {
            gear: table,
            mask_s,
            mask_l,
            min,
            avg,
            max,
        }
    }

    /// The end of the chunk that starts `data`, when `data` holds either the
    /// rest of the content (`complete`) or a whole maximal chunk; positions
    /// below `known_free` are already known to be no cut.
    pub(crate) fn cut(&self, data: &[u8], complete: bool, known_free: usize) -> Cut {
        let len = data.len();
        let complete = complete || len >= self.max;
        if len <= self.min {
            return if complete {
                Cut::At(len)
            } else {
                Cut::NoneBefore(self.min)
            };
        }
        // Positions are tested in pairs (as the crate does): below the
        // average size with the stricter mask, then with the looser one.
        let remaining = len.min(self.max);
        let strict_end = self.avg.min(len) / 2 * 2;
        let end = remaining / 2 * 2;
        let from = known_free.max(self.min);
        let found = self
            .first_hit(data, from, strict_end, self.mask_s)
            .or_else(|| self.first_hit(data, from.max(strict_end), end, self.mask_l));
        match found {
            Some(at) => Cut::At(at),
            None if complete => Cut::At(remaining),
            None => Cut::NoneBefore(end),
        }
    }

    /// The gear hash before position `at`.
    fn hash_before(&self, data: &[u8], at: usize) -> u64 {
        data[at.saturating_sub(WINDOW).max(self.min)..at]
            .iter()
            .fold(0, |hash, &byte| self.roll(hash, byte))
    }

    fn roll(&self, hash: u64, byte: u8) -> u64 {
        (hash << 1).wrapping_add(self.gear[byte as usize])
    }

    /// The first position in `from..to` whose hash has none of `mask`'s bits.
    fn first_hit(&self, data: &[u8], from: usize, to: usize, mask: u64) -> Option<usize> {
        if from >= to {
            return None;
        }
        let mut at = from;
        while at + LANES * SPAN <= to {
            if let Some(hit) = self.first_hit_in_lanes(data, at, mask) {
                return Some(hit);
            }
            at += LANES * SPAN;
        }
        self.first_hit_from(data, at, to, self.hash_before(data, at), mask)
    }

    /// One hash at a time, from `hash` (the one before `from`).
    fn first_hit_from(
        &self,
        data: &[u8],
        from: usize,
        to: usize,
        mut hash: u64,
        mask: u64,
    ) -> Option<usize> {
        for (at, &byte) in data[from..to].iter().enumerate() {
            hash = self.roll(hash, byte);
            if hash & mask == 0 {
                return Some(from + at);
            }
        }
        None
    }

    /// The first hit in `start..start + LANES * SPAN`, each lane rolling over
    /// its stretch two bytes per step.
    fn first_hit_in_lanes(&self, data: &[u8], start: usize, mask: u64) -> Option<usize> {
        let lanes: [&[u8]; LANES] =
            std::array::from_fn(|lane| &data[start + lane * SPAN..start + (lane + 1) * SPAN]);
        let mut hashes: [u64; LANES] =
            std::array::from_fn(|lane| self.hash_before(data, start + lane * SPAN));
        let mut step = 0;
        let hit_step = loop {
            if step == SPAN {
                return None;
            }
            let (mut first_hit, mut second_hit) = (false, false);
            let mut after_first = [0; LANES];
            for lane in 0..LANES {
                let hash = self.roll(hashes[lane], lanes[lane][step]);
                first_hit |= hash & mask == 0;
                after_first[lane] = hash;
                hashes[lane] = self.roll(hash, lanes[lane][step + 1]);
                second_hit |= hashes[lane] & mask == 0;
            }
            if first_hit {
                hashes = after_first;
                break step;
            }
            if second_hit {
                break step + 1;
            }
            step += 2;
        };
        // The lowest lane that hit at this step; lanes below it may still hit
        // later in their stretches, which come first.
        let hit_lane = hashes.iter().position(|hash| hash & mask == 0)?;
        let earlier_hit = hashes[..hit_lane]
            .iter()
            .enumerate()
            .find_map(|(lane, &hash)| {
                let stretch = start + lane * SPAN;
                self.first_hit_from(data, stretch + hit_step + 1, stretch + SPAN, hash, mask)
            });
        earlier_hit.or(Some(start + hit_lane * SPAN + hit_step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastcdc::v2020::{MASKS, cut_gear};
    use proptest::prelude::*;

    /// Data whose bytes come from `alphabet` values only: few distinct
    /// windows, so long runs with no cut and maximal chunks.
    fn data(len: usize, seed: u64, alphabet: u8) -> Vec<u8> {
        let mut bytes = crate::content::tests::pseudo_random(len, seed);
        bytes.iter_mut().for_each(|byte| *byte %= alphabet.max(1));
        bytes
    }

    /// Chunk lengths as the crate's own loop finds them.
    fn crate_cuts(
        data: &[u8],
        min: usize,
        avg: usize,
        max: usize,
        masks: (u64, u64),
    ) -> Vec<usize> {
        let (gear, gear_ls) = get_gear_with_seed(0);
        let (mut at, mut cuts) = (0, Vec::new());
        while at < data.len() {
            let (_, len) = cut_gear(
                &data[at..],
                min,
                avg,
                max,
                masks.0,
                masks.1,
                masks.0 << 1,
                masks.1 << 1,
                &gear,
                &gear_ls,
            );
            cuts.push(len);
            at += len;
        }
        cuts
    }

    /// Chunk lengths from this cutter, the data coming `window` bytes at a time.
    fn cuts(cutter: &Cutter, data: &[u8], window: usize) -> Vec<usize> {
        let (mut at, mut known_free, mut cuts) = (0, 0, Vec::new());
        let mut seen = window.min(data.len());
        while at < data.len() {
            match cutter.cut(&data[at..seen], seen == data.len(), known_free) {
                Cut::At(len) => {
                    cuts.push(len);
                    at += len;
                    known_free = 0;
                }
                Cut::NoneBefore(free) => {
                    assert!(seen - at < cutter.max, "a maximal chunk at hand has a cut");
                    known_free = free;
                    seen = seen.saturating_add(window).min(data.len());
                }
            }
        }
        cuts
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Latus's sizes and masks: the same cuts as the crate, whatever the
        /// data and however much of it is at hand at once.
        #[test]
        fn cuts_as_the_crate_does(len in 0usize..2_000_000, seed: u64, alphabet in 1u8..=255, window in 1usize..300_000) {
            let data = data(len, seed, alphabet);
            let masks = select_masks(AVG_CHUNK, Normalization::Level1);
            let expected = crate_cuts(&data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK, masks);
            prop_assert_eq!(cuts(Cutter::standard(), &data, usize::MAX), expected.clone());
            prop_assert_eq!(cuts(Cutter::standard(), &data, window), expected);
        }

        /// Masks of few bits: many cuts, several in one round of the lanes.
        #[test]
        fn cuts_as_the_crate_does_when_cuts_are_dense(len in 0usize..400_000, seed: u64, bits in 6usize..12, window in 1usize..100_000) {
            let data = data(len, seed, 255);
            let masks = (MASKS[bits + 1], MASKS[bits - 1]);
            let cutter = Cutter::new(64, 1 << bits, 16 << bits, masks.0, masks.1);
            let expected = crate_cuts(&data, 64, 1 << bits, 16 << bits, masks);
            prop_assert_eq!(cuts(&cutter, &data, window), expected);
        }
    }
}
