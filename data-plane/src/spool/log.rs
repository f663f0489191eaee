//! The spool's write-ahead log: what a group of operations changed, appended as one checksummed
//! frame and flushed before anyone is told it is durable.
//!
//! The tables are written only by a checkpoint, in one durable transaction. A checkpoint runs
//! beside new commits, so the log has two files used in turn: when a checkpoint starts, the
//! frames it will hold stay in the current file and new frames go to the start of the other one.
//! Frames carry consecutive group numbers and a checksum salted per round (one file's run of
//! frames); a round's salt follows from the previous round's and the group it ended at. The
//! tables record the last group they hold, the file after it and that round's salt, so after a
//! crash exactly the frames after the checkpoint are redone: that file's, then (when a later
//! checkpoint never committed) the other file's. A stale frame from an earlier round (even one
//! quoted inside a newer frame's payload), or a torn one, ends a file's replay.
//!
//! Each file is written in place, zero-filled up front: a flush then writes data only, without
//! the file-size metadata an append also has to flush (which doubled the flush's cost). Where
//! the file system allows it, frames are written with `O_DIRECT | O_DSYNC`, whole 4 KiB blocks
//! at a time, which makes them durable in one system call: on this project's test machines that
//! took a third less CPU than a write and an `fdatasync`, and a fifth less time. The block a frame
//! ends in is written again, identical up to that point, with the next frame: a torn write can
//! only tear the new frame, whose checksum then fails.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: u32 = 0x4f4d_5731; // "OMW1"
/// magic, payload length, group, checksum.
const HEADER: usize = 4 + 4 + 8 + 4;
/// A checkpoint is due once a round holds this much; each file is zero-filled to it at creation.
pub const CHECKPOINT_BYTES: u64 = 8 * 1024 * 1024;
const CASTAGNOLI: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

pub struct Log {
    files: [Writer; 2],
    /// The file this round's frames go to.
    pub file: usize,
    /// Where the next frame goes: the bytes written in this round.
    pub offset: u64,
    /// The group number of the last frame (or of the checkpoint, right after one).
    pub group: u64,
    /// This round's checksum salt.
    salt: u64,
    /// The last append failed: its frame may be on disk, or part of it, where the next frame
    /// goes. Only that next frame, written over it, makes a new round safe to start.
    unsettled: bool,
}

/// Where a round of the log starts, as the tables record it: after group `group`, in file
/// `file`, salted `salt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub group: u64,
    pub file: usize,
    pub salt: u64,
}

/// A fresh salt for a new round of the log.
pub fn new_salt() -> u64 {
    u64::from_le_bytes(omni_core::crypto::random_bytes())
}

/// The salt of the round that follows one salted `salt` ending at group `group`: known to a
/// replay that reaches that group, unlike any earlier round's (splitmix64's finalizer).
fn next_salt(salt: u64, group: u64) -> u64 {
    let mut z = salt ^ group.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The log's two files beside the spool's base at `base`: `<name>.log` and `<name>.log.1`.
pub fn paths(base: &Path) -> [std::path::PathBuf; 2] {
    [base.with_extension("log"), base.with_extension("log.1")]
}

/// A frame being built: room for its header, then the encoded changes, so that appending it
/// copies nothing.
pub struct Frame(Vec<u8>);

impl Default for Frame {
    fn default() -> Frame {
        Frame(vec![0; HEADER])
    }
}

impl Frame {
    pub fn push(&mut self, change: &Change<'_>) {
        change.encode(&mut self.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.len() == HEADER
    }

    fn payload(&self) -> &[u8] {
        &self.0[HEADER..]
    }
}

fn checksum(salt: u64, group: u64, payload: &[u8]) -> u32 {
    let mut digest = CASTAGNOLI.digest();
    digest.update(&salt.to_le_bytes());
    digest.update(&group.to_le_bytes());
    digest.update(payload);
    digest.finalize()
}

impl Log {
    /// Opens (creating) the log's files beside the base at `base` and returns, in order, the
    /// payloads of the frames written after the checkpoint's `round`: that file's, then the
    /// other file's if a round followed there. The caller redoes them, then checkpoints and
    /// [`Log::restart`]s before appending.
    pub fn open(base: &Path, round: Round) -> io::Result<(Log, Vec<Vec<u8>>)> {
        let paths = paths(base);
        let files = [open_file(&paths[0])?, open_file(&paths[1])?];
        let mut redo = Vec::new();
        let after = replay(&files[round.file], round.group, round.salt, &mut redo)?;
        // The round after it, if a checkpoint started one there and never committed.
        let other = 1 - round.file;
        let group = replay(&files[other], after, next_salt(round.salt, after), &mut redo)?;
        let [first, second] = files;
        let files = [Writer::open(&paths[0], first), Writer::open(&paths[1], second)];
        Ok((Log { files, file: round.file, offset: 0, group, salt: round.salt, unsettled: false }, redo))
    }

    /// Appends `frame` as the next group's and flushes it.
    pub fn append(&mut self, frame: &mut Frame) -> io::Result<()> {
        let group = self.group + 1;
        let length =
            u32::try_from(frame.payload().len()).map_err(|_| io::Error::other("a spool log frame over 4 GiB"))?;
        let crc = checksum(self.salt, group, frame.payload());
        let header = &mut frame.0[..HEADER];
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&length.to_le_bytes());
        header[8..16].copy_from_slice(&group.to_le_bytes());
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        self.unsettled = true;
        self.files[self.file].write_durably(&frame.0, self.offset)?;
        self.unsettled = false;
        self.offset += frame.0.len() as u64;
        self.group = group;
        Ok(())
    }

    /// Starts the next round in the other file, for a checkpoint that will hold everything up
    /// to now; returns the round for it to record. The file's earlier frames (from two rounds
    /// ago, which the last checkpoint holds) are stale from here on. After a failed append, an
    /// empty frame is written in its place first: a replay could otherwise take the failed frame
    /// as this round's last, and then miss the next round, which follows the one before it.
    pub fn next_round(&mut self) -> io::Result<Round> {
        if self.unsettled {
            self.append(&mut Frame::default())?;
        }
        self.salt = next_salt(self.salt, self.group);
        self.file = 1 - self.file;
        self.offset = 0;
        Ok(Round { group: self.group, file: self.file, salt: self.salt })
    }

    /// After a checkpoint (at open) that recorded `round`: the tables hold everything, the next
    /// frame goes first in its file, and what the files hold from before is stale.
    pub fn restart(&mut self, round: Round) {
        (self.file, self.offset, self.salt, self.unsettled) = (round.file, 0, round.salt, false);
    }
}

/// Opens (creating) one of the log's files, zero-filled to [`CHECKPOINT_BYTES`].
fn open_file(path: &Path) -> io::Result<File> {
    // Owner-only, like the node's other files: it holds message contents.
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
    let len = file.metadata()?.len();
    if len < CHECKPOINT_BYTES {
        let zeros = [0; 64 * 1024];
        let mut offset = len;
        while offset < CHECKPOINT_BYTES {
            let n = zeros.len().min((CHECKPOINT_BYTES - offset) as usize);
            file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        file.sync_all()?;
        // A new file's name must survive a crash along with the frames in it.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(file)
}

/// Appends to `redo` the payloads of the frames at the start of `file` that follow group `after`
/// in the round salted `salt`; returns the last group read (`after` for none).
fn replay(file: &File, after: u64, salt: u64, redo: &mut Vec<Vec<u8>>) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let (mut at, mut group) = (0, after);
    let mut header = [0; HEADER];
    // Frame by frame: the file is mostly zeros or stale frames, not worth holding whole.
    while at + HEADER as u64 <= len {
        file.read_exact_at(&mut header, at)?;
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
        let (magic, length, crc) = (word(0), word(4) as u64, word(16));
        let number = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let end = at + HEADER as u64 + length;
        if magic != MAGIC || number != group + 1 || end > len {
            break;
        }
        let mut payload = vec![0; length as usize];
        file.read_exact_at(&mut payload, at + HEADER as u64)?;
        if crc != checksum(salt, number, &payload) {
            break;
        }
        redo.push(payload);
        group = number;
        at = end;
    }
    Ok(group)
}

/// The block size direct writes are aligned to (a multiple of any disk's logical block).
const BLOCK: usize = 4096;

/// The direct-write buffer is kept up to this size whatever the frames need.
const KEEP_BUFFER: usize = 1 << 20;

/// How frames reach the disk.
enum Writer {
    /// `O_DIRECT | O_DSYNC`. `buffer` holds, from its first aligned byte, the block at `held`
    /// (the one the last frame ended in), so that the next frame's first block is written again
    /// with what it already holds. `buffered` is the same file opened without them, for a device
    /// that turns out to refuse 4 KiB direct writes.
    Direct { file: File, buffered: File, buffer: Vec<u8>, held: Option<u64> },
    /// A write, then `fdatasync` (file systems without `O_DIRECT`, such as tmpfs).
    Buffered(File),
}

impl Writer {
    fn open(path: &Path, buffered: File) -> Writer {
        #[cfg(target_os = "linux")]
        {
            let flags = libc::O_DIRECT | libc::O_DSYNC;
            if let Ok(file) = OpenOptions::new().read(true).write(true).custom_flags(flags).open(path) {
                return Writer::Direct { file, buffered, buffer: Vec::new(), held: None };
            }
        }
        let _ = path;
        Writer::Buffered(buffered)
    }

    /// Writes `bytes` at `offset` and returns once they are on disk.
    fn write_durably(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Writer::Buffered(file) => {
                file.write_all_at(bytes, offset)?;
                file.sync_data()
            }
            Writer::Direct { file, buffered, buffer, held } => match write_direct(file, buffer, held, bytes, offset) {
                // Blocks larger than 4 KiB (a direct write is then refused, and wrote nothing).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(error = %e, "spool log: direct writes refused; writing and syncing instead");
                    *self = Writer::Buffered(buffered.try_clone()?);
                    self.write_durably(bytes, offset)
                }
                written => written,
            },
        }
    }
}

/// One direct write of the whole blocks `bytes` covers at `offset`.
fn write_direct(
    file: &File,
    buffer: &mut Vec<u8>,
    held: &mut Option<u64>,
    bytes: &[u8],
    offset: u64,
) -> io::Result<()> {
    let block_start = offset - offset % BLOCK as u64;
    let kept = (offset - block_start) as usize;
    let end = kept + bytes.len();
    let padded = end.div_ceil(BLOCK) * BLOCK;
    let needed = padded + BLOCK;
    // Room for the frame, and for its first aligned byte wherever the allocation lands; given
    // back once frames are much smaller again than one large group's.
    if buffer.len() < needed || (buffer.len() > KEEP_BUFFER && needed * 4 < buffer.len()) {
        *buffer = vec![0; needed.next_power_of_two()];
        *held = None;
    }
    let start = buffer.as_ptr().align_offset(BLOCK);
    let aligned = &mut buffer[start..start + padded];
    if kept > 0 && *held != Some(block_start) {
        // Not the block held (a failed frame's place given back, a new buffer): read it.
        *held = None;
        file.read_exact_at(&mut aligned[..BLOCK], block_start)?;
    }
    aligned[kept..end].copy_from_slice(bytes);
    aligned[end..].fill(0);
    *held = None;
    file.write_all_at(aligned, block_start)?;
    let last = end - end % BLOCK;
    if last < end {
        aligned.copy_within(last..padded, 0);
        *held = Some(block_start + last as u64);
    }
    Ok(())
}

/// One change to the spool's tables, as the log records it: redoing it needs nothing but itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Change<'a> {
    InboxPut(u64, &'a [u8]),
    InboxDelete(u64),
    SeenPut(&'a str, i64),
    SeenPrune(i64),
    AnswerPut(&'a str, &'a str),
    AnswerDelete(&'a str),
    SendPut(&'a str, u8),
    SendDelete(&'a str),
    OutboxPut(u64, &'a [u8]),
    OutboxDeleteThrough(u64),
    AttemptPut(u64, u32),
    AttemptDelete(u64),
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Change<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let number = |out: &mut Vec<u8>, tag: u8, n: u64| {
            out.push(tag);
            out.extend_from_slice(&n.to_le_bytes());
        };
        match *self {
            Change::InboxPut(seq, message) => {
                number(out, 1, seq);
                put_bytes(out, message);
            }
            Change::InboxDelete(seq) => number(out, 2, seq),
            Change::SeenPut(key, at) => {
                number(out, 3, at as u64);
                put_bytes(out, key.as_bytes());
            }
            Change::SeenPrune(before) => number(out, 4, before as u64),
            Change::AnswerPut(id, text) => {
                out.push(5);
                put_bytes(out, id.as_bytes());
                put_bytes(out, text.as_bytes());
            }
            Change::AnswerDelete(id) => {
                out.push(6);
                put_bytes(out, id.as_bytes());
            }
            Change::SendPut(key, state) => {
                number(out, 7, u64::from(state));
                put_bytes(out, key.as_bytes());
            }
            Change::SendDelete(key) => {
                out.push(8);
                put_bytes(out, key.as_bytes());
            }
            Change::OutboxPut(seq, event) => {
                number(out, 9, seq);
                put_bytes(out, event);
            }
            Change::OutboxDeleteThrough(seq) => number(out, 10, seq),
            Change::AttemptPut(seq, n) => {
                number(out, 11, seq);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Change::AttemptDelete(seq) => number(out, 12, seq),
        }
    }

    /// The changes of one frame, in order; `None` at the first that cannot be read (a frame
    /// passed its checksum, so only a different build could write one).
    pub fn decode_all(mut payload: &[u8]) -> Option<Vec<Change<'_>>> {
        let mut changes = Vec::new();
        while !payload.is_empty() {
            changes.push(Change::decode(&mut payload)?);
        }
        Some(changes)
    }

    fn decode<'a>(input: &mut &'a [u8]) -> Option<Change<'a>> {
        fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (input.get(..n)?, input.get(n..)?);
            *input = rest;
            Some(head)
        }
        fn u64_of(input: &mut &[u8]) -> Option<u64> {
            Some(u64::from_le_bytes(take(input, 8)?.try_into().ok()?))
        }
        fn bytes_of<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
            let len = u32::from_le_bytes(take(input, 4)?.try_into().ok()?) as usize;
            take(input, len)
        }
        fn str_of<'a>(input: &mut &'a [u8]) -> Option<&'a str> {
            std::str::from_utf8(bytes_of(input)?).ok()
        }
        let tag = *take(input, 1)?.first()?;
        Some(match tag {
            1 => Change::InboxPut(u64_of(input)?, bytes_of(input)?),
            2 => Change::InboxDelete(u64_of(input)?),
            3 => {
                let at = u64_of(input)? as i64;
                Change::SeenPut(str_of(input)?, at)
            }
            4 => Change::SeenPrune(u64_of(input)? as i64),
            5 => Change::AnswerPut(str_of(input)?, str_of(input)?),
            6 => Change::AnswerDelete(str_of(input)?),
            7 => {
                let state = u8::try_from(u64_of(input)?).ok()?;
                Change::SendPut(str_of(input)?, state)
            }
            8 => Change::SendDelete(str_of(input)?),
            9 => Change::OutboxPut(u64_of(input)?, bytes_of(input)?),
            10 => Change::OutboxDeleteThrough(u64_of(input)?),
            11 => {
                let seq = u64_of(input)?;
                Change::AttemptPut(seq, u32::from_le_bytes(take(input, 4)?.try_into().ok()?))
            }
            12 => Change::AttemptDelete(u64_of(input)?),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip() {
        let changes = [
            Change::InboxPut(7, b"message"),
            Change::InboxDelete(7),
            Change::SeenPut("i\u{0}k", -5),
            Change::SeenPrune(1_700_000_000_000),
            Change::AnswerPut("t1", "héllo"),
            Change::AnswerDelete("t1"),
            Change::SendPut("t1/0", 2),
            Change::SendDelete("t1/0"),
            Change::OutboxPut(9, b""),
            Change::OutboxDeleteThrough(9),
            Change::AttemptPut(3, 4),
            Change::AttemptDelete(3),
        ];
        let mut payload = Vec::new();
        for change in &changes {
            change.encode(&mut payload);
        }
        assert_eq!(Change::decode_all(&payload).unwrap(), changes);
        assert_eq!(Change::decode_all(&payload[..payload.len() - 1]), None, "a cut change is not read");
    }

    fn frame(payload: &[u8]) -> Frame {
        let mut frame = Frame::default();
        frame.0.extend_from_slice(payload);
        frame
    }

    fn round(group: u64, file: usize, salt: u64) -> Round {
        Round { group, file, salt }
    }

    fn append_all(log: &mut Log, payloads: &[&str]) {
        for payload in payloads {
            log.append(&mut frame(payload.as_bytes())).unwrap();
        }
    }

    fn strings(redo: Vec<Vec<u8>>) -> Vec<String> {
        redo.into_iter().map(|p| String::from_utf8(p).unwrap()).collect()
    }

    #[test]
    fn replay_stops_at_stale_or_torn_frames() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("spool.redb");
        {
            let (mut log, redo) = Log::open(&base, round(0, 0, 7)).unwrap();
            assert!(redo.is_empty());
            append_all(&mut log, &["one", "two", "three"]);
            assert_eq!(log.group, 3);
        }
        let (_, redo) = Log::open(&base, round(0, 0, 7)).unwrap();
        assert_eq!(strings(redo), ["one", "two", "three"]);
        assert!(Log::open(&base, round(0, 0, 8)).unwrap().1.is_empty(), "frames of another round are not redone");
        // A checkpoint at group 3 started a new round: the old frames are stale, and so is what
        // follows a new, shorter first frame.
        let (mut log, redo) = Log::open(&base, round(3, 0, 9)).unwrap();
        assert!(redo.is_empty());
        log.restart(round(3, 0, 9));
        append_all(&mut log, &["four"]);
        let (_, redo) = Log::open(&base, round(3, 0, 9)).unwrap();
        assert_eq!(strings(redo), ["four"]);
        // A torn frame (its checksum fails) ends the replay too.
        let file = OpenOptions::new().write(true).open(&paths(&base)[0]).unwrap();
        file.write_all_at(b"X", HEADER as u64).unwrap();
        let (_, redo) = Log::open(&base, round(3, 0, 9)).unwrap();
        assert!(redo.is_empty());
    }

    /// Rounds alternate between the two files. A replay from the checkpoint's round goes on
    /// into the round after it (a checkpoint that never committed), and no further.
    #[test]
    fn replay_follows_the_rounds_a_checkpoint_left_unrecorded() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("spool.redb");
        let (mut log, _) = Log::open(&base, round(0, 0, 7)).unwrap();
        log.restart(round(0, 0, 7));
        append_all(&mut log, &["a1", "a2"]);
        // A checkpoint starts: its round (recorded only once it commits) goes to the other file.
        let second = log.next_round().unwrap();
        assert_eq!((second.group, second.file), (2, 1));
        append_all(&mut log, &["b3", "b4"]);
        let (_, redo) = Log::open(&base, round(0, 0, 7)).unwrap();
        assert_eq!(strings(redo), ["a1", "a2", "b3", "b4"], "the checkpoint never committed: both rounds");
        let (_, redo) = Log::open(&base, second).unwrap();
        assert_eq!(strings(redo), ["b3", "b4"], "it committed: the rounds after it");

        // The next checkpoint starts a round in the first file again, over the stale frames.
        let third = log.next_round().unwrap();
        assert_eq!((third.group, third.file), (4, 0));
        append_all(&mut log, &["c5"]);
        let (_, redo) = Log::open(&base, second).unwrap();
        assert_eq!(strings(redo), ["b3", "b4", "c5"]);
        let (_, redo) = Log::open(&base, third).unwrap();
        assert_eq!(strings(redo), ["c5"]);
        // A round with no frames: the replay still looks for the one after it.
        let fourth = log.next_round().unwrap();
        let fifth = log.next_round().unwrap();
        assert_eq!((fourth.group, fifth.group, fifth.file), (5, 5, 0));
        append_all(&mut log, &["e6"]);
        let (_, redo) = Log::open(&base, fourth).unwrap();
        assert_eq!(strings(redo), ["e6"]);
        // The first round is two checkpoints old: what its salt would chain to is stale.
        let (_, redo) = Log::open(&base, round(0, 0, 7)).unwrap();
        assert_eq!(strings(redo), Vec::<String>::new());
    }

    /// A failed append may have left its frame on disk. The next round starts after an empty
    /// frame written over it, so a replay goes on into that round instead of stopping at the
    /// failed frame's group.
    #[test]
    fn a_round_after_a_failed_append_still_follows() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("spool.redb");
        let (mut log, _) = Log::open(&base, round(0, 0, 7)).unwrap();
        log.restart(round(0, 0, 7));
        append_all(&mut log, &["a1"]);
        // As if "a2" reached the disk but its write reported a failure.
        let (offset, group) = (log.offset, log.group);
        append_all(&mut log, &["a2"]);
        (log.offset, log.group, log.unsettled) = (offset, group, true);
        let next = log.next_round().unwrap();
        assert_eq!((next.group, next.file), (2, 1), "the empty frame took group 2");
        append_all(&mut log, &["b3"]);
        let (_, redo) = Log::open(&base, round(0, 0, 7)).unwrap();
        assert_eq!(strings(redo), ["a1", "", "b3"]);
    }

    /// Frames written at offsets and lengths that start and end mid-block, a frame's place given
    /// back and taken by a shorter one, read back byte for byte; both ways of writing.
    #[test]
    fn durable_writes_keep_what_the_blocks_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.log");
        std::fs::write(&path, vec![0xEE; 64 * 1024]).unwrap();
        let buffered = || OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let direct = Writer::open(&path, buffered());
        if !matches!(direct, Writer::Direct { .. }) {
            eprintln!("O_DIRECT is not available for {}: only buffered writes are tested", path.display());
        }
        for mut writer in [direct, Writer::Buffered(buffered())] {
            let mut expected = vec![0xEE; 64 * 1024];
            let mut offset = 0;
            let mut write = |writer: &mut Writer, offset: u64, len: usize, fill: u8| {
                let bytes = vec![fill; len];
                writer.write_durably(&bytes, offset).unwrap();
                expected[offset as usize..offset as usize + len].copy_from_slice(&bytes);
                if matches!(writer, Writer::Direct { .. }) {
                    // The rest of the last block is zeroed.
                    let end = offset as usize + len;
                    expected[end..end.div_ceil(BLOCK) * BLOCK].fill(0);
                }
            };
            for (i, len) in [100, 5000, 4000 - 5100 % 4096, 10_000, 1, 3].into_iter().enumerate() {
                write(&mut writer, offset, len, i as u8 + 1);
                offset += len as u64;
            }
            // The last two frames' place given back (a failed commit), a shorter frame there.
            offset -= 4;
            write(&mut writer, offset, 2, 9);
            // A frame given back across blocks: its first block must be read again.
            write(&mut writer, offset + 2, 9000, 10);
            write(&mut writer, offset + 2, 50, 11);
            offset += 52;
            write(&mut writer, offset, 7, 12);
            let end = offset as usize + 7;
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(on_disk[..end], expected[..end]);
        }
    }
}
