//! Where a stream is: per partition of each topic it reads, the position of the next event to
//! deliver. Every event a stream sends carries the cursor just after it as its SSE `id`, so a
//! client that reconnects with `Last-Event-ID` resumes exactly after the last event it received,
//! in every partition at once: no gap and no repeat.
//!
//! On the wire a cursor is `c1.` and base64url of, per partition in order, four LEB128 varints:
//! the topic's index in the catalogue, the partition, the offset and the event's index within
//! its commit.

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use keel_topics::Topic;

const PREFIX: &str = "c1.";

/// The position of an event: its commit's offset, and its index among the commit's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub offset: i64,
    pub event_index: i32,
}

impl Position {
    pub const START: Self = Self { offset: 0, event_index: 0 };

    pub fn at_offset(offset: i64) -> Self {
        Self { offset, event_index: 0 }
    }

    /// The position just after this event.
    pub fn next(self) -> Self {
        Self { offset: self.offset, event_index: self.event_index + 1 }
    }
}

/// Per `(topic, partition)`, the next event to deliver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(BTreeMap<(Topic, i32), Position>);

impl Cursor {
    pub fn new(positions: impl IntoIterator<Item = ((Topic, i32), Position)>) -> Self {
        Self(positions.into_iter().collect())
    }

    pub fn get(&self, topic: Topic, partition: i32) -> Option<Position> {
        self.0.get(&(topic, partition)).copied()
    }

    pub fn set(&mut self, topic: Topic, partition: i32, position: Position) {
        self.0.insert((topic, partition), position);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&(Topic, i32), &Position)> {
        self.0.iter()
    }

    /// Whether the cursor names exactly these partitions (a cursor of this stream).
    pub fn covers(&self, partitions: &[(Topic, i32)]) -> bool {
        self.0.len() == partitions.len() && partitions.iter().all(|key| self.0.contains_key(key))
    }

    /// Records that the event at `position` of `topic`/`partition` was delivered.
    pub fn advance(&mut self, topic: Topic, partition: i32, position: Position) {
        let next = position.next();
        let entry = self.0.entry((topic, partition)).or_insert(next);
        if *entry < next {
            *entry = next;
        }
    }

    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(self.0.len() * 6);
        for ((topic, partition), position) in &self.0 {
            let index = Topic::ALL.iter().position(|known| known == topic).expect("every topic is in the catalogue");
            for value in [index as u64, *partition as u64, position.offset as u64, position.event_index as u64] {
                write_varint(&mut bytes, value);
            }
        }
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text.strip_prefix(PREFIX)?).ok()?;
        let mut input = bytes.as_slice();
        let mut positions = BTreeMap::new();
        while !input.is_empty() {
            let topic = *Topic::ALL.get(usize::try_from(read_varint(&mut input)?).ok()?)?;
            let partition = i32::try_from(read_varint(&mut input)?).ok()?;
            let offset = i64::try_from(read_varint(&mut input)?).ok()?;
            let event_index = i32::try_from(read_varint(&mut input)?).ok()?;
            if positions.insert((topic, partition), Position { offset, event_index }).is_some() {
                return None;
            }
        }
        Some(Self(positions))
    }
}

fn write_varint(bytes: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(byte);
            return;
        }
        bytes.push(byte | 0x80);
    }
}

fn read_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let mut cursor = Cursor::new((0..8).map(|partition| ((Topic::BlogPosts, partition), Position::at_offset(0))));
        cursor.advance(Topic::BlogPosts, 3, Position { offset: 1_234_567, event_index: 2 });
        assert_eq!(cursor.get(Topic::BlogPosts, 3), Some(Position { offset: 1_234_567, event_index: 3 }));
        let text = cursor.encode();
        assert!(text.starts_with("c1.") && text.len() < 60, "{text}");
        assert_eq!(Cursor::decode(&text), Some(cursor.clone()));
        let partitions: Vec<(Topic, i32)> = (0..8).map(|partition| (Topic::BlogPosts, partition)).collect();
        assert!(cursor.covers(&partitions));
        assert!(!cursor.covers(&partitions[..7]));
        for garbage in ["", "c1.", "c2.AAAA", "c1.%%%", "c1.gICAgICAgICAgIAB", "c1.AAAAAAAAAAAA"] {
            // (an empty cursor decodes, but covers no stream)
            assert!(Cursor::decode(garbage).is_none_or(|cursor| !cursor.covers(&partitions)), "{garbage}");
        }
    }

    #[test]
    fn advancing_never_goes_back() {
        let mut cursor = Cursor::default();
        cursor.advance(Topic::IdentityUsers, 0, Position { offset: 5, event_index: 0 });
        cursor.advance(Topic::IdentityUsers, 0, Position { offset: 4, event_index: 1 });
        assert_eq!(cursor.get(Topic::IdentityUsers, 0), Some(Position { offset: 5, event_index: 1 }));
    }
}
