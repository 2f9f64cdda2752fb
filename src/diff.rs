//! `diff_histories` for one path (the seed's rules): compare my history of a path
//! with a peer's and decide whose current version should be on both sides.
//!
//! A version is identified across devices by [`VersionId`]: who authored it and
//! when, and what it is (kind, size, mtime, mode, content hash). Whoever's current
//! version appears in the other's history is older; when neither does, the two
//! sides changed the path independently: a conflict, unless the content is the same.
//!
//! This module only decides; turning decisions into disk actions (delete, move,
//! copy, replace) is the engine's job.

use crate::content::Hash;
use crate::device::PeerId;
use crate::history::{Entry, Kind};

/// What identifies one version of a path on every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionId {
    pub author_peerid: PeerId,
    pub author_utime_ns: i64,
    pub kind: Kind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub hash: Option<Hash>,
}

impl VersionId {
    pub fn of(entry: &Entry) -> Self {
        VersionId {
            author_peerid: entry.author_peerid,
            author_utime_ns: entry.author_utime_ns,
            kind: entry.kind,
            size: entry.size,
            mtime_ns: entry.mtime_ns,
            mode: entry.mode,
            hash: entry.hash,
        }
    }

    /// Same bytes on disk (kind, content or target); metadata may differ.
    fn same_content(&self, other: &VersionId) -> bool {
        self.kind == other.kind && self.size == other.size && self.hash == other.hash
    }

    /// Same content and the same metadata a sync sets (mtime, mode).
    fn same_state(&self, other: &VersionId) -> bool {
        self.same_content(other)
            && (self.kind == Kind::Deleted
                || (self.mtime_ns == other.mtime_ns && self.mode == other.mode))
    }

    /// The deterministic winner between independent versions: the later author
    /// time, then the larger author peer id.
    fn wins_over(&self, other: &VersionId) -> bool {
        (self.author_utime_ns, self.author_peerid) > (other.author_utime_ns, other.author_peerid)
    }
}

/// The decision for one path, from my side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Both sides hold the same thing (or neither holds anything).
    InSync,
    /// My current version is older than theirs: apply theirs here.
    TakeTheirs,
    /// Their current version is older than mine: nothing to do here (they take mine).
    KeepMine,
    /// Both sides changed the path independently and the results differ: both
    /// versions are kept; the winner keeps the name, the loser becomes a conflict copy.
    Conflict { mine_wins: bool },
}

impl Verdict {
    /// The same decision seen from the other side.
    pub fn mirrored(self) -> Verdict {
        match self {
            Verdict::InSync => Verdict::InSync,
            Verdict::TakeTheirs => Verdict::KeepMine,
            Verdict::KeepMine => Verdict::TakeTheirs,
            Verdict::Conflict { mine_wins } => Verdict::Conflict {
                mine_wins: !mine_wins,
            },
        }
    }
}

/// Decides for one path, given both histories of it, newest first (empty: the side
/// has never recorded the path).
pub fn decide(mine: &[Entry], theirs: &[Entry]) -> Verdict {
    let absent = |history: &[Entry]| history.first().is_none_or(|e| e.kind == Kind::Deleted);
    let (my, their) = match (mine.first(), theirs.first()) {
        (Some(my), Some(their)) => (VersionId::of(my), VersionId::of(their)),
        // A side that never saw the path takes the other's version, if it exists.
        _ if absent(mine) && absent(theirs) => return Verdict::InSync,
        (None, Some(_)) => return Verdict::TakeTheirs,
        (Some(_), None) => return Verdict::KeepMine,
        (None, None) => return Verdict::InSync,
    };
    if my.same_state(&their) {
        return Verdict::InSync;
    }
    let seen_by = |history: &[Entry], version: &VersionId| {
        history.iter().any(|e| VersionId::of(e) == *version)
    };
    if seen_by(theirs, &my) {
        return Verdict::TakeTheirs;
    }
    if seen_by(mine, &their) {
        return Verdict::KeepMine;
    }
    // Independent changes. An edit beats a deletion (nothing is lost; the edit is
    // re-propagated), and equal content is no conflict: the winner's metadata is
    // applied on both sides.
    let mine_wins = match (my.kind, their.kind) {
        (Kind::Deleted, _) => false,
        (_, Kind::Deleted) => true,
        _ => my.wins_over(&their),
    };
    if my.same_content(&their) || my.kind == Kind::Deleted || their.kind == Kind::Deleted {
        return if mine_wins {
            Verdict::KeepMine
        } else {
            Verdict::TakeTheirs
        };
    }
    Verdict::Conflict { mine_wins }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: PeerId = PeerId([0xa; 32]);
    const B: PeerId = PeerId([0xb; 32]);

    /// A version authored by `author` at time `t` with content `content`
    /// (`None`: a deletion).
    fn version(author: PeerId, t: i64, content: Option<&[u8]>) -> Entry {
        Entry {
            seq: 0,
            path: "p".into(),
            kind: if content.is_some() {
                Kind::File
            } else {
                Kind::Deleted
            },
            size: content.map_or(0, |c| c.len() as u64),
            mtime_ns: if content.is_some() { t * 10 } else { 0 },
            mode: if content.is_some() { 0o644 } else { 0 },
            inode: 0,
            ctime_ns: 0,
            hash: content.map(Hash::of),
            link_target: None,
            peerid: author,
            author_peerid: author,
            author_utime_ns: t,
            utime_ns: t,
        }
    }

    /// A history, given oldest first as written, returned newest first.
    fn history(versions: &[Entry]) -> Vec<Entry> {
        versions.iter().rev().cloned().collect()
    }

    #[test]
    fn the_side_behind_takes_the_newer_version() {
        let v1 = version(A, 1, Some(b"one"));
        let v2 = version(B, 2, Some(b"two"));
        let mine = history(std::slice::from_ref(&v1));
        let theirs = history(&[v1.clone(), v2.clone()]);
        assert_eq!(decide(&mine, &theirs), Verdict::TakeTheirs);
        assert_eq!(decide(&theirs, &mine), Verdict::KeepMine);
        assert_eq!(decide(&theirs, &theirs), Verdict::InSync);
    }

    #[test]
    fn independent_edits_conflict_and_the_later_author_wins() {
        let base = version(A, 1, Some(b"base"));
        let mine = history(&[base.clone(), version(A, 5, Some(b"mine"))]);
        let theirs = history(&[base.clone(), version(B, 3, Some(b"theirs"))]);
        assert_eq!(
            decide(&mine, &theirs),
            Verdict::Conflict { mine_wins: true }
        );
        assert_eq!(
            decide(&theirs, &mine),
            Verdict::Conflict { mine_wins: false }
        );
        // At the same author time the larger peer id wins.
        let theirs = history(&[base, version(B, 5, Some(b"theirs"))]);
        assert_eq!(
            decide(&mine, &theirs),
            Verdict::Conflict { mine_wins: false }
        );
    }

    #[test]
    fn the_same_content_written_on_both_sides_is_no_conflict() {
        let base = version(A, 1, Some(b"base"));
        let mine = history(&[base.clone(), version(A, 2, Some(b"same"))]);
        let theirs = history(&[base, version(B, 3, Some(b"same"))]);
        // Same bytes, different mtimes: their later metadata is applied here.
        assert_eq!(decide(&mine, &theirs), Verdict::TakeTheirs);
        assert_eq!(decide(&theirs, &mine), Verdict::KeepMine);
    }

    #[test]
    fn an_edit_beats_a_deletion_whatever_the_times() {
        let base = version(A, 1, Some(b"base"));
        let deleted_later = history(&[base.clone(), version(A, 9, None)]);
        let edited_earlier = history(&[base, version(B, 2, Some(b"edit"))]);
        assert_eq!(decide(&deleted_later, &edited_earlier), Verdict::TakeTheirs);
        assert_eq!(decide(&edited_earlier, &deleted_later), Verdict::KeepMine);
    }

    #[test]
    fn a_path_one_side_never_saw() {
        let created = history(&[version(A, 1, Some(b"new"))]);
        assert_eq!(decide(&[], &created), Verdict::TakeTheirs);
        assert_eq!(decide(&created, &[]), Verdict::KeepMine);
        let gone = history(&[version(A, 1, Some(b"x")), version(A, 2, None)]);
        assert_eq!(decide(&[], &gone), Verdict::InSync);
        assert_eq!(decide(&[], &[]), Verdict::InSync);
    }

    /// Histories of two devices that share a common prefix and then each append
    /// their own versions (what happens between two syncs).
    fn diverged() -> impl Strategy<Value = (Vec<Entry>, Vec<Entry>)> {
        let step = (0..4u8, prop::option::of(0..3u8));
        (
            prop::collection::vec(step.clone(), 0..4),
            prop::collection::vec(step.clone(), 0..4),
            prop::collection::vec(step, 0..4),
        )
            .prop_map(|(shared, only_a, only_b)| {
                let make = |author: PeerId, offset: i64, steps: &[(u8, Option<u8>)]| {
                    steps
                        .iter()
                        .enumerate()
                        .map(|(i, (t, content))| {
                            let content = content.map(|c| vec![c]);
                            version(
                                author,
                                offset + i as i64 * 4 + *t as i64,
                                content.as_deref(),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                let shared = make(A, 0, &shared);
                let mut a = shared.clone();
                a.extend(make(A, 100, &only_a));
                let mut b = shared;
                b.extend(make(B, 100, &only_b));
                (history(&a), history(&b))
            })
    }

    proptest! {
        /// Both sides reach the same decision about the same pair of histories.
        #[test]
        fn both_sides_agree((a, b) in diverged()) {
            prop_assert_eq!(decide(&a, &b), decide(&b, &a).mirrored());
        }

        /// A side whose history is a prefix of the other's is never asked to keep
        /// its own version or to conflict: it is simply behind.
        #[test]
        fn a_side_that_is_behind_takes_the_other(a in diverged().prop_map(|(a, _)| a), keep in 0usize..5) {
            let behind: Vec<Entry> = a[a.len().min(keep)..].to_vec();
            let verdict = decide(&behind, &a);
            prop_assert!(matches!(verdict, Verdict::TakeTheirs | Verdict::InSync), "{:?}", verdict);
        }
    }
}
