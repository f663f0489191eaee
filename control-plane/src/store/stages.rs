//! A trace's stages as stored: one LZ4-compressed protobuf list in the trace's own row
//! (`traces.stages`), written whole when stages arrive. One row per message instead of one per
//! stage halved what the control plane spends storing a message's trace. Traces stored before
//! keep their stages in the `trace_stages` table, which is still read (and deleted from).

use super::{StoreError, TraceStageRecord};
use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct StoredStages {
    #[prost(message, repeated, tag = "1")]
    stages: Vec<StoredStage>,
}

#[derive(Clone, PartialEq, Message)]
struct StoredStage {
    #[prost(int64, tag = "1")]
    seq: i64,
    #[prost(string, tag = "2")]
    stage: String,
    #[prost(int64, tag = "3")]
    at: i64,
    #[prost(int64, tag = "4")]
    duration_ms: i64,
    #[prost(string, tag = "5")]
    detail: String,
    #[prost(string, tag = "6")]
    payload: String,
}

/// A stage to store, borrowed from wherever it is.
#[derive(Clone, Copy)]
pub struct StageRef<'a> {
    pub seq: i64,
    pub stage: &'a String,
    pub at: i64,
    pub duration_ms: i64,
    pub detail: &'a String,
    pub payload: &'a String,
}

impl<'a> From<&'a TraceStageRecord> for StageRef<'a> {
    fn from(s: &'a TraceStageRecord) -> StageRef<'a> {
        StageRef {
            seq: s.seq,
            stage: &s.stage,
            at: s.at,
            duration_ms: s.duration_ms,
            detail: &s.detail,
            payload: &s.payload,
        }
    }
}

impl StageRef<'_> {
    /// Encoded as a [`StoredStage`], without copying its strings into one first.
    fn encoded_len(&self) -> usize {
        use prost::encoding::{int64, string};
        int64::encoded_len(1, &self.seq)
            + string::encoded_len(2, self.stage)
            + int64::encoded_len(3, &self.at)
            + int64::encoded_len(4, &self.duration_ms)
            + string::encoded_len(5, self.detail)
            + string::encoded_len(6, self.payload)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        use prost::encoding::{WireType, encode_key, encode_varint, int64, string};
        encode_key(1, WireType::LengthDelimited, out);
        encode_varint(self.encoded_len() as u64, out);
        int64::encode(1, &self.seq, out);
        string::encode(2, self.stage, out);
        int64::encode(3, &self.at, out);
        int64::encode(4, &self.duration_ms, out);
        string::encode(5, self.detail, out);
        string::encode(6, self.payload, out);
    }
}

/// What encoding reuses from one trace to the next: the LZ4 table (allocated for each trace
/// otherwise; it is still cleared for each) and the buffers.
#[derive(Default)]
struct Scratch {
    table: lz4_flex::block::CompressTable,
    encoded: Vec<u8>,
    compressed: Vec<u8>,
}

/// Inputs from this size on need LZ4's large table (lz4_flex switches at `u16::MAX`).
const SMALL_TABLE_INPUT: usize = u16::MAX as usize;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// The stored form of `stages` (in seq order): a [`StoredStages`], LZ4-compressed with its
/// length before it (as `lz4_flex::block::compress_prepend_size` writes it).
pub fn encode<'a>(stages: impl IntoIterator<Item = StageRef<'a>>) -> Vec<u8> {
    SCRATCH.with_borrow_mut(|Scratch { table, encoded, compressed }| {
        encoded.clear();
        for stage in stages {
            stage.encode(encoded);
        }
        if encoded.len() >= SMALL_TABLE_INPUT {
            // The reused table would turn into the large one for good, and the buffers kept
            // would be as large.
            let stored = lz4_flex::block::compress_prepend_size(encoded);
            *encoded = Vec::new();
            return stored;
        }
        let most = lz4_flex::block::get_maximum_output_size(encoded.len());
        if compressed.len() < most {
            compressed.resize(most, 0);
        }
        let length = lz4_flex::block::compress_into_with_table(encoded, compressed, table)
            .expect("the output holds the largest compressed size");
        let mut stored = Vec::with_capacity(4 + length);
        stored.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        stored.extend_from_slice(&compressed[..length]);
        stored
    })
}

pub fn decode(blob: &[u8]) -> Result<Vec<TraceStageRecord>, StoreError> {
    let corrupt = |e: String| StoreError::Corrupt(format!("trace stages: {e}"));
    let bytes = lz4_flex::block::decompress_size_prepended(blob).map_err(|e| corrupt(e.to_string()))?;
    let stored = StoredStages::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
    Ok(stored
        .stages
        .into_iter()
        .map(|s| TraceStageRecord {
            seq: s.seq,
            stage: s.stage,
            at: s.at,
            duration_ms: s.duration_ms,
            detail: s.detail,
            payload: s.payload,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(seq: i64, name: &str) -> TraceStageRecord {
        TraceStageRecord {
            seq,
            stage: name.into(),
            at: 100 + seq,
            payload: format!("{{\"n\":{seq}}}"),
            ..Default::default()
        }
    }

    #[test]
    fn stages_round_trip() {
        let stored = vec![stage(0, "received"), stage(2, "agent_request")];
        assert_eq!(decode(&encode(stored.iter().map(StageRef::from))).unwrap(), stored);
        assert_eq!(decode(&encode([])).unwrap(), []);
        assert!(matches!(decode(b"not lz4"), Err(StoreError::Corrupt(_))));
        // The same bytes as the one-call form of the format, and so for a second trace with
        // the buffers reused.
        let large = TraceStageRecord { payload: "x".repeat(100_000), ..stage(3, "agent_response") };
        assert_eq!(decode(&encode([StageRef::from(&large)])).unwrap(), [large]);
        for stored in [stored.clone(), vec![stage(7, "completed")]] {
            let mut plain = Vec::new();
            stored.iter().for_each(|s| StageRef::from(s).encode(&mut plain));
            assert_eq!(encode(stored.iter().map(StageRef::from)), lz4_flex::block::compress_prepend_size(&plain));
        }
    }
}
