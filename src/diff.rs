//! `diff_histories` for one path (the seed's rules): compare my history of a path
//! with a peer's and decide whose current version should be on both sides.
//!
//! A version is identified across devices by [`VersionId`]: who authored it and
//! when, and what it is (kind, size, mtime, mode, content hash). Whoever's current
//! version appears in the other's history is older; when neither does, the two
//! sides changed the path independently: a conflict, unless the content is the same.
//!
//! [`plan`] turns the decisions for every path into the actions that bring my
//! folder up to date, cheapest first: delete, move, copy, replace. The merger
//! applies them.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::content::Hash;
use crate::device::PeerId;
use crate::error::Result;
use crate::folder::check_relative;
use crate::history::{Entry, HistoryStore, Kind};

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

    /// Same content and the same metadata a sync sets (mtime, mode). A
    /// directory's mtime moves with its content: only its mode is its metadata.
    pub fn same_state(&self, other: &VersionId) -> bool {
        self.same_content(other)
            && match self.kind {
                Kind::Deleted => true,
                Kind::Dir => self.mode == other.mode,
                Kind::File | Kind::Symlink => {
                    self.mtime_ns == other.mtime_ns && self.mode == other.mode
                }
            }
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
    match (seen_by(theirs, &my), seen_by(mine, &their)) {
        (true, false) => return Verdict::TakeTheirs,
        (false, true) => return Verdict::KeepMine,
        // Each side once held the other's current version: one of them took an
        // old version back through a third replica. Both versions were seen and
        // superseded somewhere, so no conflict: the later author wins on both sides.
        (true, true) => {
            return if my.wins_over(&their) {
                Verdict::KeepMine
            } else {
                Verdict::TakeTheirs
            };
        }
        (false, false) => {}
    }
    // Independent changes. An edit beats a deletion (nothing is lost; the edit is
    // re-propagated), and equal content is no conflict: the winner's metadata is
    // applied on both sides.
    // A directory keeps its name against a file or symlink: renaming it away would
    // move everything inside it.
    let mine_wins = match (my.kind, their.kind) {
        (Kind::Deleted, _) => false,
        (_, Kind::Deleted) => true,
        (Kind::Dir, other) if other != Kind::Dir => true,
        (other, Kind::Dir) if other != Kind::Dir => false,
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

/// One step that brings a path of my folder to the peer's version.
#[derive(Debug, Clone)]
pub struct Action {
    /// The version the path holds afterwards (a deletion for [`Op::Delete`]).
    pub target: Entry,
    /// What my history says the path holds now (`None`: nothing). The disk must
    /// still match it when the action runs, or the action waits for a rescan.
    pub current: Option<Entry>,
    pub op: Op,
}

#[derive(Debug, Clone)]
pub enum Op {
    Delete,
    /// Rename my file `source`, which the peer deleted in the same change, to the path.
    Move {
        source: Box<Entry>,
        source_deletion: Box<Entry>,
    },
    /// Copy my file `source`, which has the new content.
    Copy {
        source: Box<Entry>,
    },
    /// Build the file from chunks: those I hold anywhere are copied locally, the
    /// rest are read from the peer.
    Replace,
    MakeDir,
    Symlink,
    /// The content is already here: set mtime and mode, record the version.
    SetMeta,
    /// Rename my version (the target), which lost a conflict, to `copy_path`; the
    /// winner is placed at the path by a later action.
    ConflictCopy {
        copy_path: String,
    },
}

impl Action {
    pub fn path(&self) -> &str {
        &self.target.path
    }

    /// One line for `--dry-run`.
    pub fn describe(&self) -> String {
        let path = self.path();
        match &self.op {
            Op::Delete => format!("delete {path}"),
            Op::Move { source, .. } => format!("move {} -> {path}", source.path),
            Op::Copy { source } => format!("copy {} -> {path}", source.path),
            Op::Replace => format!("replace {path} ({} bytes)", self.target.size),
            Op::MakeDir => format!("mkdir {path}"),
            Op::Symlink => format!(
                "symlink {path} -> {}",
                self.target.link_target.as_deref().unwrap_or("")
            ),
            Op::SetMeta => format!("meta {path}"),
            Op::ConflictCopy { copy_path } => format!("conflict {path} -> {copy_path}"),
        }
    }

    pub fn op_name(&self) -> &'static str {
        match self.op {
            Op::Delete => "delete",
            Op::Move { .. } => "move",
            Op::Copy { .. } => "copy",
            Op::Replace => "replace",
            Op::MakeDir => "mkdir",
            Op::Symlink => "symlink",
            Op::SetMeta => "meta",
            Op::ConflictCopy { .. } => "conflict",
        }
    }
}

/// A conflict this side resolves by keeping its own version as a copy.
#[derive(Debug, Clone, Serialize)]
pub struct ConflictCopy {
    pub path: String,
    pub copy_path: String,
}

/// Everything my folder must do to take the peer's newer versions.
#[derive(Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Entries from the peer that were refused (bad paths).
    pub warnings: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    pub fn conflicts(&self) -> Vec<ConflictCopy> {
        self.actions
            .iter()
            .filter_map(|a| match &a.op {
                Op::ConflictCopy { copy_path } => Some(ConflictCopy {
                    path: a.path().to_string(),
                    copy_path: copy_path.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Files and symlinks this plan deletes (moves are not deletions).
    pub fn deletions(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| {
                matches!(a.op, Op::Delete)
                    && a.current.as_ref().is_some_and(|c| c.kind != Kind::Dir)
            })
            .count()
    }
}

/// Compares my history with what I received of `peer`'s and plans the actions
/// that apply its newer versions here.
pub fn plan(store: &HistoryStore, peer: &PeerId) -> Result<Plan> {
    // Paths with no entry on either side since both were last identical (or,
    // for a daemon, since this side last applied all it received) need nothing
    // from the peer still: a sync that changes 1% of a folder plans 1% of its paths.
    // One state of the history for the whole plan, and the queries per path
    // below without a lock each.
    let _snapshot = store.read_snapshot()?;
    let marks = store.identical_marks(peer)?;
    let (mine, theirs) = match marks {
        Some(marks) => store.latest_changed_since(peer, marks)?,
        None => (store.latest_all()?, store.remote_latest_all(peer)?),
    };
    plan_paths(
        store,
        peer,
        LocalFiles::new(store, mine, marks.is_none()),
        theirs,
    )
}

/// Plans the paths of `received`, entries of `peer`'s just received in sequence
/// order (the last of each path among them is its current version), and of
/// those alone: for a side that applies what it receives while the peer's scan
/// goes on.
pub fn plan_received(store: &HistoryStore, peer: &PeerId, received: Vec<Entry>) -> Result<Plan> {
    let _snapshot = store.read_snapshot()?;
    let mut theirs: HashMap<String, Entry> = HashMap::with_capacity(received.len());
    for entry in received {
        theirs.insert(entry.path.clone(), entry);
    }
    let mut mine = Vec::new();
    for path in theirs.keys() {
        mine.extend(store.latest_by_path(path)?);
    }
    // In path order, as a whole plan goes: conflict copies get the same names.
    let mut theirs: Vec<Entry> = theirs.into_values().collect();
    theirs.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    plan_paths(store, peer, LocalFiles::new(store, mine, false), theirs)
}

/// Plans the paths of `theirs` (the peer's current entries), against `local`.
fn plan_paths(
    store: &HistoryStore,
    peer: &PeerId,
    local: LocalFiles<'_>,
    theirs: Vec<Entry>,
) -> Result<Plan> {
    let mine = &local.by_path;
    let mut plan = Plan::default();
    let mut takes: Vec<(Entry, Option<Entry>)> = Vec::new();
    let mut losers: Vec<Entry> = Vec::new();
    for theirs in theirs {
        if let Err(e) = check_relative(&theirs.path) {
            plan.warnings.push(e.to_string());
            continue;
        }
        let current = mine.get(&theirs.path).filter(|e| e.kind != Kind::Deleted);
        let verdict = match mine.get(&theirs.path) {
            None if theirs.kind == Kind::Deleted => Verdict::InSync,
            None => Verdict::TakeTheirs,
            Some(my) if VersionId::of(my).same_state(&VersionId::of(&theirs)) => Verdict::InSync,
            Some(_) => decide(
                &store.history(&theirs.path)?,
                &store.remote_history(peer, &theirs.path)?,
            ),
        };
        match verdict {
            Verdict::InSync | Verdict::KeepMine | Verdict::Conflict { mine_wins: true } => {}
            Verdict::TakeTheirs => {
                if theirs.kind != Kind::Deleted || current.is_some() {
                    takes.push((theirs, current.cloned()));
                }
            }
            Verdict::Conflict { mine_wins: false } => {
                if let Some(loser) = current {
                    losers.push(loser.clone());
                }
                takes.push((theirs, None));
            }
        }
    }

    let mut taken_names = HashSet::new();
    for loser in losers {
        let copy_path = free_name(&conflict_name(&loser.path, &loser), |name| {
            Ok(taken_names.contains(name) || local.exists(name)?)
        })?;
        taken_names.insert(copy_path.clone());
        plan.actions.push(Action {
            target: loser.clone(),
            current: Some(loser),
            op: Op::ConflictCopy { copy_path },
        });
    }

    // Files the peer deleted that I still hold, by content: sources for moves.
    let mut deleted_here: HashMap<Hash, Vec<(Entry, Entry)>> = HashMap::new();
    for (theirs, current) in &takes {
        if let (Kind::Deleted, Some(cur)) = (theirs.kind, current)
            && cur.kind == Kind::File
            && let Some(hash) = cur.hash
        {
            deleted_here
                .entry(hash)
                .or_default()
                .push((cur.clone(), theirs.clone()));
        }
    }
    let mut moved_away: HashSet<String> = HashSet::new();
    for (theirs, current) in takes {
        let op = match theirs.kind {
            Kind::Deleted => Op::Delete,
            Kind::Dir if current.as_ref().is_some_and(|c| c.kind == Kind::Dir) => Op::SetMeta,
            Kind::Dir => Op::MakeDir,
            Kind::Symlink
                if current.as_ref().is_some_and(|c| {
                    c.kind == Kind::Symlink && c.link_target == theirs.link_target
                }) =>
            {
                Op::SetMeta
            }
            Kind::Symlink => Op::Symlink,
            Kind::File
                if current
                    .as_ref()
                    .is_some_and(|c| c.kind == Kind::File && c.hash == theirs.hash) =>
            {
                Op::SetMeta
            }
            Kind::File if theirs.size == 0 => Op::Replace,
            Kind::File => {
                let hash = theirs.hash.unwrap_or(Hash([0; 32]));
                match deleted_here.get_mut(&hash).and_then(Vec::pop) {
                    Some((source, source_deletion)) => {
                        moved_away.insert(source.path.clone());
                        Op::Move {
                            source: Box::new(source),
                            source_deletion: Box::new(source_deletion),
                        }
                    }
                    None => match local.holder_of(&hash, &theirs.path)? {
                        Some(source) => Op::Copy {
                            source: Box::new(source),
                        },
                        None => Op::Replace,
                    },
                }
            }
        };
        plan.actions.push(Action {
            target: theirs,
            current,
            op,
        });
    }
    // A moved file's deletion is part of the move.
    plan.actions
        .retain(|a| !(matches!(a.op, Op::Delete) && moved_away.contains(a.path())));
    sort_actions(&mut plan.actions);
    Ok(plan)
}

/// Puts actions in the order the merger must run them (see [`phase`]).
pub(crate) fn sort_actions(actions: &mut Vec<Action>) {
    // Each phase once rather than at every comparison, and indices sorted
    // rather than the actions themselves (large): a first sync plans thousands.
    let phases: Vec<(u8, i64)> = actions.iter().map(phase).collect();
    let mut order: Vec<usize> = (0..actions.len()).collect();
    order.sort_by(|&a, &b| {
        phases[a]
            .cmp(&phases[b])
            .then_with(|| actions[a].path().cmp(actions[b].path()))
    });
    let mut unsorted: Vec<Option<Action>> = actions.drain(..).map(Some).collect();
    actions.extend(order.into_iter().filter_map(|i| unsorted[i].take()));
}

/// The order that keeps every step possible: conflict copies out of the way,
/// directories before what goes in them, copies before their source may move,
/// deletions last, directories deepest first, and files that replace a directory
/// once it is empty.
fn phase(action: &Action) -> (u8, i64) {
    let depth = action.path().bytes().filter(|&b| b == b'/').count() as i64;
    let over_dir = action.current.as_ref().is_some_and(|c| c.kind == Kind::Dir);
    match &action.op {
        Op::ConflictCopy { .. } => (0, 0),
        Op::MakeDir => (1, depth),
        Op::SetMeta if action.target.kind == Kind::Dir => (1, depth),
        Op::Delete if over_dir => (6, -depth),
        Op::Delete => (5, 0),
        _ if over_dir => (7, depth),
        Op::Copy { .. } => (2, 0),
        Op::Move { .. } => (3, 0),
        Op::Replace | Op::Symlink | Op::SetMeta => (4, 0),
    }
}

/// `dir/name.sync-conflict-YYYYMMDD-HHMMSS-<short author id>.ext`, from the losing
/// version alone, so every device names the same conflict the same way.
pub fn conflict_name(path: &str, loser: &Entry) -> String {
    let (dir, name) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let time = jiff::Timestamp::from_nanosecond(loser.author_utime_ns as i128)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y%m%d-%H%M%S");
    format!(
        "{dir}{stem}.sync-conflict-{time}-{}{ext}",
        loser.author_peerid.short()
    )
}

/// `name`, or `name` with a counter when a path of that name exists here already.
/// `name`, or `name-2`, `name-3`… when taken.
fn free_name(name: &str, mut taken: impl FnMut(&str) -> Result<bool>) -> Result<String> {
    let mut candidate = name.to_string();
    let mut counter = 2;
    while taken(&candidate)? {
        candidate = format!("{name}-{counter}");
        counter += 1;
    }
    Ok(candidate)
}

/// The current entries of this side that a plan looks at: those of the paths it
/// decides, and, for names and copy sources, either all of them (a full plan)
/// or the history itself (a plan of the paths changed since the last identical
/// state).
struct LocalFiles<'a> {
    store: &'a HistoryStore,
    by_path: HashMap<String, Entry>,
    /// A current file of each content, when `by_path` holds every path.
    by_hash: Option<HashMap<Hash, String>>,
}

impl<'a> LocalFiles<'a> {
    fn new(store: &'a HistoryStore, entries: Vec<Entry>, complete: bool) -> Self {
        let by_path: HashMap<String, Entry> =
            entries.into_iter().map(|e| (e.path.clone(), e)).collect();
        let by_hash = complete.then(|| {
            let mut by_hash = HashMap::new();
            for entry in by_path.values() {
                if let (Kind::File, Some(hash)) = (entry.kind, entry.hash) {
                    let path: &mut String =
                        by_hash.entry(hash).or_insert_with(|| entry.path.clone());
                    // The first by name: the same source whichever way it is found.
                    if entry.path < *path {
                        *path = entry.path.clone();
                    }
                }
            }
            by_hash
        });
        LocalFiles {
            store,
            by_path,
            by_hash,
        }
    }

    /// Whether something is at `path` now.
    fn exists(&self, path: &str) -> Result<bool> {
        let current = match (&self.by_hash, self.by_path.get(path)) {
            (_, Some(entry)) => Some(entry.clone()),
            (Some(_), None) => None,
            (None, None) => self.store.latest_by_path(path)?,
        };
        Ok(current.is_some_and(|e| e.kind != Kind::Deleted))
    }

    /// A current file with content `hash` at another path than `path`.
    fn holder_of(&self, hash: &Hash, path: &str) -> Result<Option<Entry>> {
        Ok(match &self.by_hash {
            Some(by_hash) => by_hash
                .get(hash)
                .filter(|holder| holder.as_str() != path)
                .and_then(|holder| self.by_path.get(holder))
                .cloned(),
            None => self
                .store
                .latests_by_hash(hash)?
                .into_iter()
                .find(|holder| holder.path != path),
        })
    }
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
