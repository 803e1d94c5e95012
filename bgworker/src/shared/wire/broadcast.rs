//! A broadcast sent from SQL (`realtime.send`, `realtime.send_binary`,
//! `realtime.broadcast_changes`) as a transaction record carries it: a
//! change of kind 4 with no relation, written among the transaction's row
//! changes. Decoding sets broadcasts apart (`Transaction::broadcasts`);
//! the worker delivers them after the transaction's row events.

use super::{Reader, WireError};

/// The relation index a broadcast change carries: none.
pub(super) const NO_RELATION: u16 = u16::MAX;
pub(super) const KIND: u8 = 4;

const PRIVATE: u8 = 1;
const BINARY: u8 = 2;

/// A broadcast from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbBroadcast {
    /// The topic without `realtime:` (what `realtime.topic()` returns).
    pub topic: String,
    pub event: String,
    /// The message's id (a UUID), which clients get as `meta.id`.
    pub id: String,
    pub private: bool,
    pub payload: DbPayload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbPayload {
    /// JSON text (`realtime.send`).
    Json(String),
    /// Raw bytes (`realtime.send_binary`).
    Binary(Vec<u8>),
}

impl DbBroadcast {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (binary, bytes) = match &self.payload {
            DbPayload::Json(text) => (false, text.as_bytes()),
            DbPayload::Binary(bytes) => (true, bytes.as_slice()),
        };
        put_broadcast(out, self.private, binary, [&self.topic, &self.event, &self.id], bytes);
    }

    /// What identifies its topic in the ring's loss notes
    /// ([`topic_loss_id`]).
    pub fn loss_id(&self) -> u32 {
        topic_loss_id(&self.topic, self.private)
    }
}

/// Appends a broadcast change: `texts` are its topic, event and id.
pub fn put_broadcast(out: &mut Vec<u8>, private: bool, binary: bool, texts: [&str; 3], payload: &[u8]) {
    out.extend_from_slice(&NO_RELATION.to_le_bytes());
    out.push(KIND);
    out.push(if private { PRIVATE } else { 0 } | if binary { BINARY } else { 0 });
    for text in texts {
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The id a topic's lost broadcasts are noted under among the ring's lost
/// relations: a hash with the top bit set. A relation OID of the same
/// value (or another topic's) only makes a notice go where it was not
/// needed; nothing lost goes unannounced.
pub fn topic_loss_id(topic: &str, private: bool) -> u32 {
    // FNV-1a
    let mut hash: u32 = 0x811c_9dc5;
    for byte in topic.as_bytes().iter().chain([u8::from(private)].iter()) {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash | 0x8000_0000
}

/// Reads a broadcast change after its relation and kind.
pub(super) fn read(r: &mut Reader<'_>) -> Result<DbBroadcast, WireError> {
    let flags = r.u8()?;
    let topic = r.string()?;
    let event = r.string()?;
    let id = r.string()?;
    let len = r.u32()? as usize;
    let bytes = r.take(len)?.to_vec();
    let payload = if flags & BINARY != 0 {
        DbPayload::Binary(bytes)
    } else {
        let at = r.pos - len;
        DbPayload::Json(String::from_utf8(bytes).map_err(|_| WireError(at))?)
    };
    Ok(DbBroadcast {
        topic,
        event,
        id,
        private: flags & PRIVATE != 0,
        payload,
    })
}
