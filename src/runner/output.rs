//! An agent's output: read as bytes in bounded chunks (never a whole line at once), cut into
//! lines for parsing (each kept to [`MAX_LINE_BYTES`]), and written raw to the job's log up to
//! the node's limit, with one note line when the limit drops the rest.
//!
//! Nothing here trusts the agent: a line of any length costs at most [`MAX_LINE_BYTES`] of
//! memory per stream, invalid UTF-8 is decoded lossily for parsing (the log keeps the bytes
//! unchanged), and the reader applies backpressure on the agent rather than buffering.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::events::{parse_line, Summary};

/// Bytes read from a stream at once.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Longest part of a line kept for parsing; the rest of a longer line is only logged.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Chunks read ahead of the runner per stream before the agent is made to wait.
const CHANNEL_CHUNKS: usize = 8;
/// Room kept at the end of a capped log for the note that says so.
const NOTE_ROOM: u64 = 160;
/// Prefix of stderr lines in the log.
const STDERR_PREFIX: &[u8] = b"[stderr] ";

/// A chunk of output: whether it came from stdout, and its bytes.
pub type Chunk = (bool, Vec<u8>);

/// Start reading the agent's stdout and stderr in chunks; the receiver ends when both close.
pub fn spawn_readers<O, E>(stdout: Option<O>, stderr: Option<E>) -> mpsc::Receiver<Chunk>
where
    O: AsyncRead + Send + Unpin + 'static,
    E: AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel::<Chunk>(CHANNEL_CHUNKS);
    if let Some(stream) = stdout {
        tokio::spawn(read_stream(true, stream, tx.clone()));
    }
    if let Some(stream) = stderr {
        tokio::spawn(read_stream(false, stream, tx));
    }
    rx
}

async fn read_stream(is_stdout: bool, mut stream: impl AsyncRead + Unpin, tx: mpsc::Sender<Chunk>) {
    loop {
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx.send((is_stdout, buf)).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// A piece of a stream, as [`LineSplitter::push`] hands it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A complete line (without its `\n`) that fits in the limit.
    Line(&'a [u8]),
    /// The first bytes of a line longer than the limit (exactly the limit).
    LongStart(&'a [u8]),
    /// More bytes of that long line.
    LongMore(&'a [u8]),
    /// The long line ended; its first bytes again, for parsing.
    LongEnd(&'a [u8]),
}

/// Cuts one stream's bytes into lines, holding at most `max` bytes of a line.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    line: Vec<u8>,
    long: bool,
}

impl LineSplitter {
    /// A splitter keeping at most `max` bytes of each line.
    pub fn new(max: usize) -> Self {
        LineSplitter {
            max,
            line: Vec::new(),
            long: false,
        }
    }

    /// Feed the next bytes of the stream; `emit` receives each piece in order.
    pub fn push(&mut self, chunk: &[u8], mut emit: impl FnMut(Piece<'_>)) {
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.extend(&rest[..end], &mut emit);
            self.end_line(&mut emit);
            rest = &rest[end + 1..];
        }
        self.extend(rest, &mut emit);
    }

    /// The stream ended: hand out its unterminated last line, if any.
    pub fn finish(&mut self, mut emit: impl FnMut(Piece<'_>)) {
        if self.long || !self.line.is_empty() {
            self.end_line(&mut emit);
        }
    }

    fn extend(&mut self, part: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        if part.is_empty() {
            return;
        }
        if self.long {
            emit(Piece::LongMore(part));
            return;
        }
        let room = self.max - self.line.len();
        if part.len() <= room {
            self.line.extend_from_slice(part);
            return;
        }
        self.line.extend_from_slice(&part[..room]);
        self.long = true;
        emit(Piece::LongStart(&self.line));
        emit(Piece::LongMore(&part[room..]));
    }

    fn end_line(&mut self, emit: &mut impl FnMut(Piece<'_>)) {
        if self.long {
            emit(Piece::LongEnd(&self.line));
        } else {
            emit(Piece::Line(&self.line));
        }
        self.line.clear();
        self.long = false;
    }
}

/// A job's log file, written up to a limit; then one note line says the rest was dropped.
#[derive(Debug)]
pub struct JobLog {
    file: tokio::fs::File,
    written: u64,
    limit: u64,
    capped: bool,
}

impl JobLog {
    /// Open (append to) the log at `path`, which is kept to `limit` bytes in all.
    pub async fn open(path: &Path, limit: u64) -> std::io::Result<JobLog> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let written = file.metadata().await?.len();
        Ok(JobLog {
            file,
            written,
            limit,
            capped: written >= content_limit(limit),
        })
    }

    /// Append `bytes`, or the part of them under the limit (noting the cut when it is hit).
    pub async fn write(&mut self, bytes: &[u8]) {
        if self.capped || bytes.is_empty() {
            return;
        }
        let room = content_limit(self.limit).saturating_sub(self.written);
        let keep = usize::try_from(room).map_or(bytes.len(), |room| room.min(bytes.len()));
        // Errors (a full disk) lose log lines only; the job goes on.
        if self.file.write_all(&bytes[..keep]).await.is_ok() {
            self.written += keep as u64;
        }
        if keep < bytes.len() {
            self.capped = true;
            let note = format!("\n[codex-mesh] {}\n", self.dropped());
            let _ = self.file.write_all(note.as_bytes()).await;
        }
    }

    /// Whether output was dropped because the log reached its limit.
    pub fn is_capped(&self) -> bool {
        self.capped
    }

    /// What the note says: output beyond the limit was dropped.
    pub fn dropped(&self) -> String {
        format!(
            "output beyond {} was dropped (the node's --max-log-mb)",
            size_text(self.limit)
        )
    }

    /// Flush what was written.
    pub async fn flush(&mut self) {
        let _ = self.file.flush().await;
    }
}

/// Bytes of output a log of `limit` bytes holds, leaving room for the note.
fn content_limit(limit: u64) -> u64 {
    limit.saturating_sub(NOTE_ROOM)
}

fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// What the agent printed, as far as the result needs it, and its log.
#[derive(Debug)]
pub struct Output {
    codex_events: bool,
    summary: Summary,
    last_stdout: Option<String>,
    stdout: LineSplitter,
    stderr: LineSplitter,
    log: JobLog,
    pending: Vec<u8>,
}

/// What the output came to, once the agent has ended.
#[derive(Debug)]
pub struct Collected {
    /// Codex events folded (Codex agents).
    pub summary: Summary,
    /// The last non-blank stdout line (other agents).
    pub last_stdout: Option<String>,
    /// Set when the log limit dropped output: what the note says.
    pub log_capped: Option<String>,
}

impl Output {
    /// Collect output into `log`; stdout is Codex JSONL when `codex_events`.
    pub fn new(codex_events: bool, log: JobLog) -> Self {
        Output {
            codex_events,
            summary: Summary::default(),
            last_stdout: None,
            stdout: LineSplitter::new(MAX_LINE_BYTES),
            stderr: LineSplitter::new(MAX_LINE_BYTES),
            log,
            pending: Vec::new(),
        }
    }

    /// Run `step` with the splitter of one stream and the sink its lines go to.
    fn split(&mut self, is_stdout: bool, step: impl FnOnce(&mut LineSplitter, &mut Sink<'_>)) {
        let splitter = if is_stdout {
            &mut self.stdout
        } else {
            &mut self.stderr
        };
        let mut sink = Sink {
            is_stdout,
            codex_events: self.codex_events,
            log: &mut self.pending,
            summary: &mut self.summary,
            last_stdout: &mut self.last_stdout,
        };
        step(splitter, &mut sink);
    }

    /// Log a chunk and fold its complete stdout lines into the summary or the last line.
    pub async fn take(&mut self, is_stdout: bool, chunk: &[u8]) {
        self.split(is_stdout, |splitter, sink| {
            splitter.push(chunk, |piece| sink.piece(piece))
        });
        self.write_pending().await;
    }

    /// The streams are done: take their unterminated last lines, flush the log.
    pub async fn finish(mut self) -> Collected {
        for is_stdout in [true, false] {
            self.split(is_stdout, |splitter, sink| {
                splitter.finish(|piece| sink.piece(piece))
            });
        }
        self.write_pending().await;
        self.log.flush().await;
        Collected {
            log_capped: self.log.is_capped().then(|| self.log.dropped()),
            summary: self.summary,
            last_stdout: self.last_stdout,
        }
    }

    async fn write_pending(&mut self) {
        self.log.write(&self.pending).await;
        self.pending.clear();
    }
}

/// Where the pieces of one stream go: log bytes, and stdout lines to parse.
struct Sink<'a> {
    is_stdout: bool,
    codex_events: bool,
    log: &'a mut Vec<u8>,
    summary: &'a mut Summary,
    last_stdout: &'a mut Option<String>,
}

impl Sink<'_> {
    fn piece(&mut self, piece: Piece<'_>) {
        let prefix: &[u8] = if self.is_stdout { b"" } else { STDERR_PREFIX };
        match piece {
            Piece::Line(line) => {
                self.log.extend_from_slice(prefix);
                self.log.extend_from_slice(line);
                self.log.push(b'\n');
                self.parse(line);
            }
            Piece::LongStart(start) => {
                self.log.extend_from_slice(prefix);
                self.log.extend_from_slice(start);
            }
            Piece::LongMore(more) => self.log.extend_from_slice(more),
            Piece::LongEnd(start) => {
                self.log.push(b'\n');
                self.parse(start);
            }
        }
    }

    fn parse(&mut self, line: &[u8]) {
        if !self.is_stdout {
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = String::from_utf8_lossy(line);
        if self.codex_events {
            if let Some(event) = parse_line(&text) {
                self.summary.add(event);
            }
        } else if !text.trim().is_empty() {
            *self.last_stdout = Some(text.into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Line(String),
        LongStart(String),
        LongMore(String),
        LongEnd(String),
    }

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Owned> {
        let mut splitter = LineSplitter::new(max);
        let mut out = Vec::new();
        let mut take = |piece: Piece<'_>| {
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            out.push(match piece {
                Piece::Line(b) => Owned::Line(text(b)),
                Piece::LongStart(b) => Owned::LongStart(text(b)),
                Piece::LongMore(b) => Owned::LongMore(text(b)),
                Piece::LongEnd(b) => Owned::LongEnd(text(b)),
            })
        };
        for chunk in chunks {
            splitter.push(chunk, &mut take);
        }
        splitter.finish(&mut take);
        out
    }

    fn line(text: &str) -> Owned {
        Owned::Line(text.into())
    }

    #[test]
    fn lines_are_split_across_chunks_and_the_last_one_needs_no_newline() {
        assert_eq!(
            split(100, &[b"one\ntw", b"o\n\nthr", b"ee"]),
            vec![line("one"), line("two"), line(""), line("three")]
        );
        assert_eq!(split(100, &[b"a\n"]), vec![line("a")]);
        assert_eq!(split(100, &[]), vec![]);
    }

    #[test]
    fn a_line_over_the_limit_is_cut_for_parsing_but_handed_out_whole() {
        let pieces = split(4, &[b"abcdefg", b"hij\nxy\nabcd\n"]);
        assert_eq!(
            pieces,
            vec![
                Owned::LongStart("abcd".into()),
                Owned::LongMore("efg".into()),
                Owned::LongMore("hij".into()),
                Owned::LongEnd("abcd".into()),
                line("xy"),
                line("abcd"),
            ]
        );
        // Unterminated at the end of the stream.
        assert_eq!(
            split(2, &[b"abc"]),
            vec![
                Owned::LongStart("ab".into()),
                Owned::LongMore("c".into()),
                Owned::LongEnd("ab".into()),
            ]
        );
    }

    #[test]
    fn invalid_utf8_does_not_stop_the_lines() {
        let pieces = split(100, &[b"ok\n\xff\xfe bad\nafter\n"]);
        assert_eq!(
            pieces,
            vec![line("ok"), line("\u{fffd}\u{fffd} bad"), line("after")]
        );
    }

    async fn collect(limit: u64, chunks: &[Chunk]) -> (Collected, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.log");
        let log = JobLog::open(&path, limit).await.unwrap();
        let mut output = Output::new(false, log);
        for (is_stdout, chunk) in chunks {
            output.take(*is_stdout, chunk).await;
        }
        let collected = output.finish().await;
        (collected, std::fs::read(&path).unwrap())
    }

    #[tokio::test]
    async fn the_log_keeps_raw_bytes_and_the_last_line_is_decoded_lossily() {
        let (collected, log) = collect(
            1 << 20,
            &[
                (true, b"first\n\xff\xfe\n".to_vec()),
                (false, b"warn\n".to_vec()),
                (true, b"last \xc3".to_vec()),
            ],
        )
        .await;
        assert_eq!(log, b"first\n\xff\xfe\n[stderr] warn\nlast \xc3\n");
        assert_eq!(collected.last_stdout.as_deref(), Some("last \u{fffd}"));
        assert!(collected.log_capped.is_none());
    }

    #[tokio::test]
    async fn the_log_stops_at_its_limit_with_a_note() {
        let limit = 1000;
        let big = vec![b'x'; 5000];
        let (collected, log) = collect(
            limit,
            &[
                (true, big.clone()),
                (true, b"\nend\n".to_vec()),
                (true, big),
            ],
        )
        .await;
        assert!(log.len() as u64 <= limit, "{}", log.len());
        let text = String::from_utf8_lossy(&log);
        assert!(
            text.ends_with(
                "[codex-mesh] output beyond 1000 bytes was dropped (the node's --max-log-mb)\n"
            ),
            "{text}"
        );
        assert_eq!(text.matches("[codex-mesh]").count(), 1);
        assert_eq!(
            collected.last_stdout.as_deref(),
            Some(&"x".repeat(5000)[..])
        );
        assert!(collected
            .log_capped
            .is_some_and(|n| n.contains("1000 bytes")));
    }
}
