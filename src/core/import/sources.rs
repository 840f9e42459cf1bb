//! Readers that turn each kind of file into a stream of JSON values with their line or row.

use std::io::{self, BufRead, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use super::json_stream::{JsonArrayStream, StreamError};
use super::{ImportError, human_bytes};

/// One item read from a file: a JSON value, or a record that could not even be read as one.
pub(super) enum Item {
    /// A record's raw value.
    Value { line: u64, value: Value },
    /// A record rejected before format parsing (not JSON, too long, bad UTF-8, …).
    Bad { line: u64, reason: String },
}

/// Why a source stopped before the end of its file: nothing more can be read, what came before
/// is good. The text says where and why.
pub(super) struct Stop(pub String);

/// A stream of items from one file.
pub(super) trait ValueSource {
    /// The next item, `None` at the end of the file.
    fn next_item(&mut self) -> Result<Option<Item>, Stop>;
    /// Bytes of the file on disk consumed so far.
    fn bytes_done(&self) -> u64;
}

/// Counts bytes read from the file on disk (before any decompression).
#[derive(Clone, Default)]
pub(super) struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Wraps a reader so that its reads are counted here.
    pub fn wrap<R: Read>(&self, inner: R) -> CountingReader<R> {
        CountingReader {
            inner,
            counter: self.clone(),
        }
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A reader that adds what it reads to a [`Counter`].
pub(super) struct CountingReader<R> {
    inner: R,
    counter: Counter,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Parses one record's bytes as JSON, or says why not.
fn parse_json(bytes: &[u8]) -> Result<Value, String> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(format!(
            "not valid UTF-8 (bad byte at column {})",
            e.valid_up_to() + 1
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        if e.line() <= 1 && e.column() <= 2 && !bytes.starts_with(b"{") && !bytes.starts_with(b"[")
        {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
            let shown: String = text.chars().take(30).collect();
            let more = if shown.len() < bytes.len() { "…" } else { "" };
            return format!("not JSON: the record starts with \"{shown}{more}\"");
        }
        let what = match e.classify() {
            serde_json::error::Category::Eof => "the record is cut off",
            _ => "not valid JSON",
        };
        // serde_json counts lines inside the record; a JSONL record is one line.
        let message = e.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        if e.line() <= 1 {
            format!("{what}: {message} at column {}", e.column())
        } else {
            format!(
                "{what}: {message} at its line {} column {}",
                e.line(),
                e.column()
            )
        }
    })
}

fn too_long(len: usize, max: usize) -> String {
    format!(
        "the record is {} long, over the {} limit for one record; skipped",
        human_bytes(len as u64),
        human_bytes(max as u64)
    )
}

/// JSON Lines: one record a line, lines read with a length limit so a huge line never sits in
/// memory.
pub(super) struct JsonlSource<R> {
    reader: R,
    counter: Counter,
    line: u64,
    buf: Vec<u8>,
    max: usize,
}

impl<R: BufRead> JsonlSource<R> {
    pub fn new(reader: R, counter: Counter, max: usize) -> Self {
        Self {
            reader,
            counter,
            line: 0,
            buf: Vec::new(),
            max,
        }
    }

    /// Reads one line into `buf` (without the newline). Returns the line's full length and
    /// whether it was kept (false when over the limit), or `None` at the end of the file.
    fn read_line(&mut self) -> io::Result<Option<(usize, bool)>> {
        self.buf.clear();
        let mut total = 0usize;
        let mut kept = true;
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                return Ok((total > 0).then_some((total, kept)));
            }
            let (take, done) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if kept {
                if self.buf.len() + take > self.max + 2 {
                    kept = false;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(&chunk[..take]);
                }
            }
            total += take;
            self.reader.consume(take);
            if done {
                return Ok(Some((total, kept)));
            }
        }
    }
}

impl<R: BufRead> ValueSource for JsonlSource<R> {
    fn next_item(&mut self) -> Result<Option<Item>, Stop> {
        loop {
            self.line += 1;
            let line = self.line;
            let (len, kept) = match self.read_line() {
                Ok(Some(x)) => x,
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(Stop(format!("reading stopped at line {line}: {e}")));
                }
            };
            if !kept {
                return Ok(Some(Item::Bad {
                    line,
                    reason: too_long(len, self.max),
                }));
            }
            let mut bytes = self.buf.as_slice();
            if line == 1 {
                bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
            }
            let bytes = bytes.trim_ascii();
            if bytes.is_empty() {
                continue;
            }
            return Ok(Some(match parse_json(bytes) {
                Ok(value) => Item::Value { line, value },
                Err(reason) => Item::Bad { line, reason },
            }));
        }
    }

    fn bytes_done(&self) -> u64 {
        self.counter.get()
    }
}

/// A JSON array of records (or an object holding one), streamed element by element.
pub(super) struct JsonArraySource<R> {
    stream: JsonArrayStream<R>,
    counter: Counter,
    max: usize,
}

impl<R: BufRead> JsonArraySource<R> {
    pub fn new(reader: R, counter: Counter, max: usize) -> Self {
        Self {
            stream: JsonArrayStream::new(reader, max),
            counter,
            max,
        }
    }
}

impl<R: BufRead> ValueSource for JsonArraySource<R> {
    fn next_item(&mut self) -> Result<Option<Item>, Stop> {
        match self.stream.next_element() {
            Ok(None) => Ok(None),
            Ok(Some(el)) => Ok(Some(match el.bytes {
                None => Item::Bad {
                    line: el.line,
                    reason: too_long(el.len, self.max),
                },
                Some(bytes) => match parse_json(&bytes) {
                    Ok(value) => Item::Value {
                        line: el.line,
                        value,
                    },
                    Err(reason) => Item::Bad {
                        line: el.line,
                        reason,
                    },
                },
            })),
            Err(StreamError::Truncated { line }) => Err(Stop(format!(
                "the file ends inside the JSON array: the record at line {line} is cut off \
                 (is the file truncated?); the complete records before it are kept"
            ))),
            Err(StreamError::Syntax { line, message }) => Err(Stop(format!(
                "line {line}: {message}; reading stopped there"
            ))),
            Err(StreamError::Io(e)) => Err(Stop(format!(
                "reading stopped at line {}: {e}",
                self.stream.line()
            ))),
            Err(StreamError::NoArray) => {
                Err(Stop("the JSON object holds no list of records".to_string()))
            }
        }
    }

    fn bytes_done(&self) -> u64 {
        self.counter.get()
    }
}

/// CSV or TSV with a header row; each row becomes an object of text fields.
pub(super) struct CsvSource<R> {
    reader: csv::Reader<R>,
    counter: Counter,
    pub headers: Vec<String>,
    row: csv::ByteRecord,
}

impl<R: Read> CsvSource<R> {
    pub fn new(
        path: &Path,
        reader: R,
        counter: Counter,
        delimiter: u8,
    ) -> Result<Self, ImportError> {
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .flexible(false)
            .from_reader(reader);
        let wrong = |why: String| ImportError::WrongKind {
            path: path.to_path_buf(),
            why,
        };
        let raw = reader
            .byte_headers()
            .map_err(|e| wrong(format!("cannot read the header row: {e}")))?
            .clone();
        let mut headers = Vec::with_capacity(raw.len());
        for (i, h) in raw.iter().enumerate() {
            let h = std::str::from_utf8(h)
                .map_err(|_| wrong(format!("header column {} is not valid UTF-8", i + 1)))?;
            headers.push(h.trim_start_matches('\u{feff}').trim().to_string());
        }
        if headers.iter().all(String::is_empty) {
            return Err(wrong("the header row is empty".to_string()));
        }
        Ok(Self {
            reader,
            counter,
            headers,
            row: csv::ByteRecord::new(),
        })
    }
}

impl<R: Read> ValueSource for CsvSource<R> {
    fn next_item(&mut self) -> Result<Option<Item>, Stop> {
        match self.reader.read_byte_record(&mut self.row) {
            Ok(false) => Ok(None),
            Ok(true) => {
                let line = self.row.position().map_or(0, csv::Position::line);
                let mut obj = Map::with_capacity(self.headers.len());
                for (name, field) in self.headers.iter().zip(self.row.iter()) {
                    match std::str::from_utf8(field) {
                        Ok(text) => {
                            obj.insert(name.clone(), Value::String(text.to_string()));
                        }
                        Err(e) => {
                            return Ok(Some(Item::Bad {
                                line,
                                reason: format!(
                                    "column \"{name}\" is not valid UTF-8 (bad byte at position {})",
                                    e.valid_up_to() + 1
                                ),
                            }));
                        }
                    }
                }
                Ok(Some(Item::Value {
                    line,
                    value: Value::Object(obj),
                }))
            }
            Err(e) => match e.kind() {
                csv::ErrorKind::UnequalLengths {
                    pos,
                    expected_len,
                    len,
                } => Ok(Some(Item::Bad {
                    line: pos.as_ref().map_or(0, csv::Position::line),
                    reason: format!("has {len} fields, the header has {expected_len}"),
                })),
                _ => Err(Stop(format!("reading stopped: {e}"))),
            },
        }
    }

    fn bytes_done(&self) -> u64 {
        self.counter.get()
    }
}

/// Parquet rows, each converted to a JSON object (nested lists and structs included).
pub(super) struct ParquetSource {
    rows: parquet::record::reader::RowIter<'static>,
    row: u64,
    total_rows: u64,
    total_bytes: u64,
}

impl ParquetSource {
    pub fn open(path: &Path, total_bytes: u64) -> Result<Self, ImportError> {
        use parquet::file::reader::FileReader;
        let file = std::fs::File::open(path).map_err(|source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let parquet_err = |why: String| ImportError::Parquet {
            path: path.to_path_buf(),
            why,
        };
        let opened = guarded(|| {
            let reader = parquet::file::serialized_reader::SerializedFileReader::new(file)?;
            let total_rows = reader.metadata().file_metadata().num_rows().max(0) as u64;
            let rows =
                parquet::record::reader::RowIter::from_file_into(Box::new(CheckedFile(reader)));
            Ok::<_, parquet::errors::ParquetError>((rows, total_rows))
        });
        let (rows, total_rows) = match opened {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(parquet_err(e.to_string())),
            Err(why) => return Err(parquet_err(why)),
        };
        Ok(Self {
            rows,
            row: 0,
            total_rows,
            total_bytes,
        })
    }
}

impl ValueSource for ParquetSource {
    fn next_item(&mut self) -> Result<Option<Item>, Stop> {
        let next = guarded(|| self.rows.next()).map_err(|why| {
            Stop(format!(
                "row {}: {why}; reading stopped there",
                self.row + 1
            ))
        })?;
        match next {
            None => Ok(None),
            Some(Ok(row)) => {
                self.row += 1;
                Ok(Some(Item::Value {
                    line: self.row,
                    value: row.to_json_value(),
                }))
            }
            Some(Err(e)) => Err(Stop(format!(
                "row {}: {e}; reading stopped there",
                self.row + 1
            ))),
        }
    }

    fn bytes_done(&self) -> u64 {
        if self.total_rows == 0 {
            return 0;
        }
        (self.row as f64 / self.total_rows as f64 * self.total_bytes as f64) as u64
    }
}

/// A parquet file reader whose page readers check each dictionary page before it is decoded.
///
/// The parquet crate sizes a dictionary from the page header's value count alone, so a page
/// claiming 1.8 billion values in a few bytes made it reserve 29.6 GB and abort the process
/// (found by fuzzing: fuzz/regressions/import_parquet). A plain-encoded value takes at least one
/// byte in the page (four for lengths and 32-bit numbers, eight for 64-bit ones), so a count
/// above what the decoded page can hold is refused before anything is reserved.
struct CheckedFile(parquet::file::serialized_reader::SerializedFileReader<std::fs::File>);

struct CheckedRowGroup<'a>(Box<dyn parquet::file::reader::RowGroupReader + 'a>);

struct CheckedPages {
    inner: Box<dyn parquet::column::page::PageReader>,
    column: String,
    min_value_bytes: usize,
}

impl parquet::file::reader::FileReader for CheckedFile {
    fn metadata(&self) -> &parquet::file::metadata::ParquetMetaData {
        self.0.metadata()
    }

    fn num_row_groups(&self) -> usize {
        self.0.num_row_groups()
    }

    fn get_row_group(
        &self,
        i: usize,
    ) -> parquet::errors::Result<Box<dyn parquet::file::reader::RowGroupReader + '_>> {
        Ok(Box::new(CheckedRowGroup(self.0.get_row_group(i)?)))
    }

    fn get_row_iter(
        &self,
        projection: Option<parquet::schema::types::Type>,
    ) -> parquet::errors::Result<parquet::record::reader::RowIter<'_>> {
        parquet::record::reader::RowIter::from_file(projection, self)
    }
}

impl parquet::file::reader::RowGroupReader for CheckedRowGroup<'_> {
    fn metadata(&self) -> &parquet::file::metadata::RowGroupMetaData {
        self.0.metadata()
    }

    fn num_columns(&self) -> usize {
        self.0.num_columns()
    }

    fn get_column_page_reader(
        &self,
        i: usize,
    ) -> parquet::errors::Result<Box<dyn parquet::column::page::PageReader>> {
        use parquet::basic::Type;
        let descr = self.0.metadata().column(i).column_descr();
        let min_value_bytes = match descr.physical_type() {
            Type::BOOLEAN => 1,
            Type::INT32 | Type::FLOAT | Type::BYTE_ARRAY => 4,
            Type::INT64 | Type::DOUBLE => 8,
            Type::INT96 => 12,
            Type::FIXED_LEN_BYTE_ARRAY => descr.type_length().max(1) as usize,
        };
        Ok(Box::new(CheckedPages {
            inner: self.0.get_column_page_reader(i)?,
            column: descr.path().string(),
            min_value_bytes,
        }))
    }

    fn get_column_bloom_filter(&self, i: usize) -> Option<&parquet::bloom_filter::Sbbf> {
        self.0.get_column_bloom_filter(i)
    }

    fn get_row_iter(
        &self,
        projection: Option<parquet::schema::types::Type>,
    ) -> parquet::errors::Result<parquet::record::reader::RowIter<'_>> {
        parquet::record::reader::RowIter::from_row_group(projection, self)
    }
}

impl CheckedPages {
    fn check(
        &self,
        page: Option<parquet::column::page::Page>,
    ) -> parquet::errors::Result<Option<parquet::column::page::Page>> {
        if let Some(parquet::column::page::Page::DictionaryPage {
            buf, num_values, ..
        }) = &page
        {
            let room = buf.len() / self.min_value_bytes;
            if *num_values as usize > room {
                return Err(parquet::errors::ParquetError::General(format!(
                    "column {}: its dictionary page claims {num_values} values but its {} bytes \
                     hold at most {room}",
                    self.column,
                    buf.len()
                )));
            }
        }
        Ok(page)
    }
}

impl Iterator for CheckedPages {
    type Item = parquet::errors::Result<parquet::column::page::Page>;

    fn next(&mut self) -> Option<Self::Item> {
        use parquet::column::page::PageReader;
        self.get_next_page().transpose()
    }
}

impl parquet::column::page::PageReader for CheckedPages {
    fn get_next_page(&mut self) -> parquet::errors::Result<Option<parquet::column::page::Page>> {
        let page = self.inner.get_next_page()?;
        self.check(page)
    }

    fn peek_next_page(
        &mut self,
    ) -> parquet::errors::Result<Option<parquet::column::page::PageMetadata>> {
        self.inner.peek_next_page()
    }

    fn skip_next_page(&mut self) -> parquet::errors::Result<()> {
        self.inner.skip_next_page()
    }

    fn supports_deferred_dictionary(&self) -> bool {
        self.inner.supports_deferred_dictionary()
    }

    fn take_deferred_dictionary(
        &mut self,
    ) -> parquet::errors::Result<Option<parquet::column::page::Page>> {
        let page = self.inner.take_deferred_dictionary()?;
        self.check(page)
    }
}

/// Runs a step of the parquet reader, turning a panic in it into a message: the parquet crate
/// asserts on some malformed files (a negative column offset, found by fuzzing:
/// fuzz/regressions/import_parquet) rather than returning an error.
fn guarded<T>(step: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).map_err(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "an internal error".to_string());
        format!("the parquet reader failed on this file ({what})")
    })
}
