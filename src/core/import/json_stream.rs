//! Streams the elements of a JSON array (or of the first array inside a top-level object) one at a
//! time, so a multi-gigabyte `.json` file never has to sit in memory whole.
//!
//! This only finds where each element starts and ends (tracking strings, escapes and nesting) and
//! counts lines; `serde_json` parses the element itself. A file that breaks off in the middle keeps
//! every element before the break, and the break is reported with its line.

use std::io::{self, BufRead};

/// One element of the array, as raw bytes.
#[derive(Debug)]
pub struct Element {
    /// Line on which the element starts, from 1.
    pub line: u64,
    /// The element's bytes, or `None` when it was longer than the limit (and skipped).
    pub bytes: Option<Vec<u8>>,
    /// Length of the element in bytes, kept or not.
    pub len: usize,
}

/// Why streaming stopped before the end of the array.
#[derive(Debug)]
pub enum StreamError {
    /// Reading the file failed.
    Io(io::Error),
    /// The bytes are not JSON at this point.
    Syntax { line: u64, message: String },
    /// The file ends before the array is closed.
    Truncated { line: u64 },
    /// A top-level object holds no array to read records from.
    NoArray,
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        StreamError::Io(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the opening bracket.
    Start,
    /// Inside the array, before an element or the closing bracket.
    InArray { first: bool },
    /// The array is closed.
    Done,
}

/// Reads the elements of the records array from a JSON document.
pub struct JsonArrayStream<R> {
    reader: R,
    line: u64,
    state: State,
    max_element_bytes: usize,
    /// Name of the key holding the array, when the document is an object.
    pub array_key: Option<String>,
}

impl<R: BufRead> JsonArrayStream<R> {
    /// A stream over `reader`; elements longer than `max_element_bytes` are skipped, not kept.
    pub fn new(reader: R, max_element_bytes: usize) -> Self {
        Self {
            reader,
            line: 1,
            state: State::Start,
            max_element_bytes,
            array_key: None,
        }
    }

    /// The line the reader has reached.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// The next element, `None` once the array is closed.
    pub fn next_element(&mut self) -> Result<Option<Element>, StreamError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Start => {
                    self.open_array()?;
                    self.state = State::InArray { first: true };
                }
                State::InArray { first } => {
                    self.skip_ws()?;
                    match self.peek()? {
                        None => return Err(StreamError::Truncated { line: self.line }),
                        Some(b']') => {
                            self.bump();
                            self.state = State::Done;
                            return Ok(None);
                        }
                        Some(b',') if !first => {
                            self.bump();
                            self.skip_ws()?;
                            if self.peek()? == Some(b']') {
                                // A trailing comma: forgive it.
                                continue;
                            }
                        }
                        Some(b) if !first => {
                            return Err(StreamError::Syntax {
                                line: self.line,
                                message: format!(
                                    "expected ',' or ']' between records, found '{}'",
                                    char::from(b)
                                ),
                            });
                        }
                        Some(_) => {}
                    }
                    self.skip_ws()?;
                    if self.peek()?.is_none() {
                        return Err(StreamError::Truncated { line: self.line });
                    }
                    let line = self.line;
                    let (bytes, len) = self.capture_value(true).map_err(|e| match e {
                        StreamError::Truncated { .. } => StreamError::Truncated { line },
                        other => other,
                    })?;
                    self.state = State::InArray { first: false };
                    return Ok(Some(Element { line, bytes, len }));
                }
            }
        }
    }

    /// Moves past the opening bracket of the records array, descending into an object if needed.
    fn open_array(&mut self) -> Result<(), StreamError> {
        // A UTF-8 byte order mark is allowed before the document.
        if self.reader.fill_buf()?.starts_with(&[0xEF, 0xBB, 0xBF]) {
            self.reader.consume(3);
        }
        self.skip_ws()?;
        match self.peek()? {
            Some(b'[') => {
                self.bump();
                Ok(())
            }
            Some(b'{') => {
                self.bump();
                loop {
                    self.skip_ws()?;
                    match self.peek()? {
                        None => return Err(StreamError::Truncated { line: self.line }),
                        Some(b'}') => return Err(StreamError::NoArray),
                        Some(b'"') => {}
                        Some(b) => {
                            return Err(StreamError::Syntax {
                                line: self.line,
                                message: format!("expected a key, found '{}'", char::from(b)),
                            });
                        }
                    }
                    let (key_bytes, _) = self.capture_value(true)?;
                    let key: String = key_bytes
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    self.skip_ws()?;
                    self.expect(b':')?;
                    self.skip_ws()?;
                    if self.peek()? == Some(b'[') {
                        self.bump();
                        self.array_key = Some(key);
                        return Ok(());
                    }
                    self.capture_value(false)?;
                    self.skip_ws()?;
                    if self.peek()? == Some(b',') {
                        self.bump();
                    }
                }
            }
            None => Err(StreamError::Truncated { line: self.line }),
            Some(b) => Err(StreamError::Syntax {
                line: self.line,
                message: format!(
                    "a JSON file must start with '[' or '{{', found '{}'",
                    char::from(b).escape_default()
                ),
            }),
        }
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        Ok(self.reader.fill_buf()?.first().copied())
    }

    fn bump(&mut self) {
        self.reader.consume(1);
    }

    fn expect(&mut self, want: u8) -> Result<(), StreamError> {
        match self.peek()? {
            Some(b) if b == want => {
                self.bump();
                Ok(())
            }
            None => Err(StreamError::Truncated { line: self.line }),
            Some(b) => Err(StreamError::Syntax {
                line: self.line,
                message: format!(
                    "expected '{}', found '{}'",
                    char::from(want),
                    char::from(b).escape_default()
                ),
            }),
        }
    }

    fn skip_ws(&mut self) -> io::Result<()> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            let n = buf
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(buf.len());
            self.line += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            let done = n < buf.len();
            self.reader.consume(n);
            if done {
                return Ok(());
            }
        }
    }

    /// Reads one JSON value starting at the current byte. Returns its bytes (if `keep` and within
    /// the limit) and its length. Scalars end at the next `,`, `]` or `}` outside any string.
    fn capture_value(&mut self, keep: bool) -> Result<(Option<Vec<u8>>, usize), StreamError> {
        let mut out = Vec::new();
        let mut len = 0usize;
        let mut kept = keep;
        let mut depth = 0u32;
        let mut in_string = false;
        let mut escape = false;
        let mut started = false;
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                // Only a bare scalar at the very end could be complete here, and inside an array
                // that still means the closing bracket is missing.
                return Err(StreamError::Truncated { line: self.line });
            }
            let mut i = 0;
            let mut done = false;
            while i < buf.len() {
                let b = buf[i];
                if in_string {
                    if escape {
                        escape = false;
                    } else if b == b'\\' {
                        escape = true;
                    } else if b == b'"' {
                        in_string = false;
                        if depth == 0 {
                            i += 1;
                            done = true;
                            break;
                        }
                    }
                } else {
                    match b {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            if depth == 0 {
                                done = true;
                                break;
                            }
                            depth -= 1;
                            if depth == 0 {
                                i += 1;
                                done = true;
                                break;
                            }
                        }
                        b',' if depth == 0 && started => {
                            done = true;
                            break;
                        }
                        _ => {}
                    }
                }
                started = true;
                i += 1;
            }
            let chunk = &buf[..i];
            self.line += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
            len += i;
            if kept {
                if len > self.max_element_bytes {
                    kept = false;
                    out = Vec::new();
                } else {
                    out.extend_from_slice(chunk);
                }
            }
            self.reader.consume(i);
            if done {
                if kept {
                    while out.last().is_some_and(u8::is_ascii_whitespace) {
                        out.pop();
                    }
                }
                return Ok((kept.then_some(out), len));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> (Vec<(u64, String)>, Option<StreamError>) {
        let mut s = JsonArrayStream::new(text.as_bytes(), 1 << 20);
        let mut out = Vec::new();
        loop {
            match s.next_element() {
                Ok(Some(e)) => out.push((e.line, String::from_utf8(e.bytes.unwrap()).unwrap())),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn splits_elements_with_lines() {
        let (els, err) =
            all("[\n {\"a\": \"x,]}\"},\n {\"b\": [1, {\"c\": 2}]}\n, 3, \"s\\\"]\"\n]");
        assert!(err.is_none(), "{err:?}");
        assert_eq!(
            els,
            vec![
                (2, "{\"a\": \"x,]}\"}".to_string()),
                (3, "{\"b\": [1, {\"c\": 2}]}".to_string()),
                (4, "3".to_string()),
                (4, "\"s\\\"]\"".to_string()),
            ]
        );
    }

    #[test]
    fn finds_the_array_inside_an_object() {
        let mut s = JsonArrayStream::new(
            &br#"{"version": {"x": [1]}, "data": [{"q": 1}, {"q": 2}], "n": 2}"#[..],
            1 << 20,
        );
        let mut n = 0;
        while let Some(e) = s.next_element().unwrap() {
            assert!(e.bytes.is_some());
            n += 1;
        }
        assert_eq!(n, 2);
        assert_eq!(s.array_key.as_deref(), Some("data"));
    }

    #[test]
    fn truncated_array_keeps_complete_elements() {
        let (els, err) = all("[{\"a\": 1},\n{\"a\": 2},\n{\"a\": ");
        assert_eq!(els.len(), 2);
        assert!(
            matches!(err, Some(StreamError::Truncated { line: 3 })),
            "{err:?}"
        );
    }

    #[test]
    fn oversized_element_is_skipped_but_counted() {
        let text = format!("[\"{}\", 1]", "x".repeat(100));
        let mut s = JsonArrayStream::new(text.as_bytes(), 50);
        let big = s.next_element().unwrap().unwrap();
        assert!(big.bytes.is_none());
        assert_eq!(big.len, 102);
        assert_eq!(s.next_element().unwrap().unwrap().bytes.unwrap(), b"1");
        assert!(s.next_element().unwrap().is_none());
    }

    #[test]
    fn object_without_array_and_garbage_are_errors() {
        let mut s = JsonArrayStream::new(&b"{\"a\": 1}"[..], 100);
        assert!(matches!(s.next_element(), Err(StreamError::NoArray)));
        let mut s = JsonArrayStream::new(&b"hello"[..], 100);
        assert!(matches!(s.next_element(), Err(StreamError::Syntax { .. })));
        // Two values with no comma come out as one element, which serde_json then rejects.
        let (els, err) = all("[1 2]");
        assert_eq!(els, vec![(1, "1 2".to_string())]);
        assert!(err.is_none());
        let (els, err) = all("[{\"a\": 1} {\"b\": 2}]");
        assert_eq!(els.len(), 1);
        assert!(matches!(err, Some(StreamError::Syntax { .. })), "{err:?}");
    }
}
