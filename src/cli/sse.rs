//! Reading a server-sent event stream (the API's `GET /api/v1/jobs/{id}/events`).

/// One event of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` name (`message` when the record names none).
    pub name: String,
    /// Its `data:` lines, joined by newlines.
    pub data: String,
}

/// Turns the bytes of a stream, as they arrive, into events.
#[derive(Debug, Default)]
pub struct SseParser {
    pending: Vec<u8>,
}

impl SseParser {
    /// Add bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = find_record_end(&self.pending) {
            let record: Vec<u8> = self.pending.drain(..end.0 + end.1).collect();
            if let Some(event) = parse_record(&String::from_utf8_lossy(&record[..end.0])) {
                events.push(event);
            }
        }
        events
    }
}

/// Where the first record ends: (its length, length of the blank-line separator).
fn find_record_end(bytes: &[u8]) -> Option<(usize, usize)> {
    (0..bytes.len()).find_map(|i| {
        if bytes[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if bytes[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else {
            None
        }
    })
}

fn parse_record(record: &str) -> Option<SseEvent> {
    let mut name = None;
    let mut data: Vec<&str> = Vec::new();
    for line in record.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = Some(value.to_string()),
            "data" => data.push(value),
            _ => {} // comments (keep-alives), ids, retry hints
        }
    }
    if name.is_none() && data.is_empty() {
        return None;
    }
    Some(SseEvent {
        name: name.unwrap_or_else(|| "message".into()),
        data: data.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_comments_are_skipped() {
        let stream = b"event: job\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: log\ndata: one\ndata: two\n\nevent: end\n\n";
        for split in 0..stream.len() {
            let mut parser = SseParser::default();
            let mut events = parser.push(&stream[..split]);
            events.extend(parser.push(&stream[split..]));
            assert_eq!(
                events,
                vec![
                    SseEvent {
                        name: "job".into(),
                        data: "{\"a\":1}".into()
                    },
                    SseEvent {
                        name: "log".into(),
                        data: "one\ntwo".into()
                    },
                    SseEvent {
                        name: "end".into(),
                        data: String::new()
                    },
                ],
                "split at {split}"
            );
        }
    }
}
