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

/// The stored form of `stages` (in seq order): a [`StoredStages`], compressed.
pub fn encode<'a>(stages: impl IntoIterator<Item = StageRef<'a>>) -> Vec<u8> {
    let mut encoded = Vec::new();
    for stage in stages {
        stage.encode(&mut encoded);
    }
    lz4_flex::block::compress_prepend_size(&encoded)
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
    }
}
