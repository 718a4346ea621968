//! Reading Server-Sent Events, for clients of the streams (`keel tail`, tests): the
//! [WHATWG event-stream format](https://html.spec.whatwg.org/multipage/server-sent-events.html),
//! fed in chunks as they arrive.

/// One event: its `event` name (`message` unless named), its `id` if it had one, its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Splits a byte stream into events. Comments (heartbeats) and events without data yield
/// nothing, as in browsers; an `id` applies even then.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    /// The last `id` seen: what to send as `Last-Event-ID` when reconnecting.
    pub last_id: Option<String>,
    /// Comment lines seen (heartbeats).
    pub comments: u64,
}

impl SseParser {
    /// A parser for a stream resumed after `last_id`.
    pub fn resuming(last_id: Option<String>) -> Self {
        Self { last_id, ..Self::default() }
    }

    /// Feeds a chunk; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some((end, separator)) = block_end(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end + separator).take(end).collect();
            if let Some(event) = self.parse(&String::from_utf8_lossy(&block)) {
                events.push(event);
            }
        }
        events
    }

    fn parse(&mut self, block: &str) -> Option<SseEvent> {
        let (mut event, mut id, mut data) = (None, None, Vec::new());
        for line in block.split(['\n', '\r']).filter(|line| !line.is_empty()) {
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_owned()),
                "id" => id = Some(value.to_owned()),
                "data" => data.push(value),
                _ => {}
            }
        }
        if id.is_some() {
            self.last_id.clone_from(&id);
        }
        (!data.is_empty()).then(|| SseEvent {
            event: event.unwrap_or_else(|| "message".into()),
            id,
            data: data.join("\n"),
        })
    }
}

/// Where the first complete block ends, and the length of the blank line that ends it.
fn block_end(buffer: &[u8]) -> Option<(usize, usize)> {
    (0..buffer.len()).find_map(|index| {
        let rest = &buffer[index..];
        [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"]
            .iter()
            .find(|separator| rest.starts_with(separator))
            .map(|s| (index, s.len()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_across_chunks_and_comments_are_skipped() {
        let mut parser = SseParser::default();
        assert!(parser.push(b": heartbeat\n\nid: c1.AA\nda").is_empty());
        let events = parser.push(b"ta: {\"a\":1}\n\nevent: lagged\r\nid: c1.AB\r\ndata: x\r\ndata: y\r\n\r\n");
        assert_eq!(
            events,
            [
                SseEvent { event: "message".into(), id: Some("c1.AA".into()), data: "{\"a\":1}".into() },
                SseEvent { event: "lagged".into(), id: Some("c1.AB".into()), data: "x\ny".into() },
            ]
        );
        assert_eq!(parser.last_id.as_deref(), Some("c1.AB"));
        assert!(parser.push(b"id: c1.AC\n\n").is_empty());
        assert_eq!(parser.last_id.as_deref(), Some("c1.AC"));
        assert_eq!(parser.comments, 1);
    }
}
