//! Strict CSV reading, shared by the training pair manifests ([`super::pairs`]) and the benchmark
//! label files (`bench::prepare::CsvTable`).
//!
//! The `csv` crate is lenient in ways that let bad input pass silently, so on top of it:
//! - **ragged rows**: every data row must have the header's number of fields;
//! - **duplicate columns**: two header cells with the same (trimmed) name are refused, since a
//!   lookup by name would silently take one of them. Empty header cells (a pandas index column)
//!   name nothing and are not compared;
//! - **quotes**: the `csv` crate ends a quoted field that never closes at the end of the file, so
//!   an unterminated quote silently swallows every later row into one field; and it appends
//!   whatever follows a closing quote to the field (`"a"b` reads `ab`), so a stray quote inside a
//!   quoted field can swallow the following rows up to the next quote. Each record's raw bytes are
//!   re-scanned with the same state machine the `csv` crate's default dialect uses (`,`, `"`,
//!   doubled quotes as escapes, CR/LF/CRLF terminators, quotes literal inside unquoted fields),
//!   and two cases are errors: a quoted field still open at the end of the file (named by the line
//!   its opening quote is on) and a closing quote followed by anything but a delimiter, a line end
//!   or the end of the file (RFC 4180 allows nothing else there).
//!
//! Line numbers come from [`super::csv_line`] (right for CRLF files and quoted newlines).

use super::csv_line::{offset_line, position_line};

/// A problem with the file as a whole (its header): the line and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvFault {
    pub line: u64,
    pub reason: String,
}

/// One data row: the line its record starts on, and the record or the reason it is malformed.
#[derive(Debug, Clone)]
pub struct StrictRow {
    pub line: u64,
    pub record: Result<csv::ByteRecord, String>,
}

/// A whole CSV file read strictly: trimmed header names (a UTF-8 BOM dropped) and every row.
#[derive(Debug, Clone)]
pub struct StrictCsv {
    pub headers: Vec<String>,
    pub rows: Vec<StrictRow>,
}

/// Reads `data` (a CSV file with a header row) with the checks of the module docs. A bad header
/// (unparsable, not UTF-8, duplicate names, an unterminated quote) is a [`CsvFault`]; a bad data
/// row is an `Err` in its [`StrictRow`], so callers can report every row. Blank lines are skipped.
pub fn read_strict(data: &[u8]) -> Result<StrictCsv, CsvFault> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(data);
    let raw_headers = rdr.byte_headers().map_err(|e| CsvFault {
        line: position_line(data, e.position()).max(1),
        reason: format!("cannot parse CSV: {e}"),
    })?;
    let header_line = position_line(data, raw_headers.position()).max(1);
    let mut headers = Vec::with_capacity(raw_headers.len());
    for (i, h) in raw_headers.iter().enumerate() {
        let h = std::str::from_utf8(h).map_err(|_| CsvFault {
            line: header_line,
            reason: format!("header cell {} is not valid UTF-8", i + 1),
        })?;
        headers.push(h.trim_start_matches('\u{feff}').trim().to_string());
    }

    // Every record with the byte it starts at (the `csv` crate's position, see `csv_line`).
    let mut records: Vec<(usize, u64, Result<csv::ByteRecord, String>)> = Vec::new();
    let mut rec = csv::ByteRecord::new();
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {
                let start = rec.position().map_or(data.len(), |p| p.byte() as usize);
                records.push((start, position_line(data, rec.position()), Ok(rec.clone())));
            }
            Err(e) => {
                // Reading bytes from memory with `flexible`, so this cannot be I/O, UTF-8 or
                // length; whatever it is, the parser cannot resynchronise: report it and stop.
                let start = e.position().map_or(data.len(), |p| p.byte() as usize);
                records.push((
                    start,
                    position_line(data, e.position()),
                    Err(format!("cannot parse CSV: {e}")),
                ));
                break;
            }
        }
    }

    let header_end = records.first().map_or(data.len(), |r| r.0);
    if let Some(fault) = scan_quotes(data, 0, header_end) {
        return Err(CsvFault {
            line: header_line,
            reason: fault,
        });
    }
    check_duplicates(&headers).map_err(|reason| CsvFault {
        line: header_line,
        reason,
    })?;

    let ends: Vec<usize> = records
        .iter()
        .skip(1)
        .map(|r| r.0)
        .chain(std::iter::once(data.len()))
        .collect();
    let rows = records
        .into_iter()
        .zip(ends)
        .map(|((start, line, record), end)| {
            let record = record.and_then(|rec| {
                if let Some(fault) = scan_quotes(data, start, end) {
                    return Err(fault);
                }
                if rec.len() != headers.len() {
                    return Err(format!(
                        "the row has {} field(s), the header {}",
                        rec.len(),
                        headers.len()
                    ));
                }
                Ok(rec)
            });
            StrictRow { line, record }
        })
        .collect();
    Ok(StrictCsv { headers, rows })
}

/// Two header cells of the same non-empty name: the error naming it and both columns (1-based).
fn check_duplicates(headers: &[String]) -> Result<(), String> {
    for (j, h) in headers.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        if let Some(i) = headers[..j].iter().position(|g| g == h) {
            return Err(format!(
                "duplicate column `{h}` (columns {} and {} of the header)",
                i + 1,
                j + 1
            ));
        }
    }
    Ok(())
}

/// Re-scans the raw bytes `data[start..end]` of one record (the `csv` crate's default dialect,
/// see the module docs) and returns the quoting problem, if any. `start` may point at the
/// previous record's line terminator or at blank lines before the record; they are skipped.
fn scan_quotes(data: &[u8], start: usize, end: usize) -> Option<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum S {
        StartRecord,
        StartField,
        InField,
        InQuoted,
        /// A quote seen inside a quoted field: the closing quote, or the first of a doubled one.
        QuoteInQuoted,
    }
    let mut state = S::StartRecord;
    let mut opened_at = start;
    for (i, &b) in data[start..end].iter().enumerate() {
        let at = start + i;
        let terminator = b == b'\r' || b == b'\n';
        state = match state {
            S::StartRecord if terminator => S::StartRecord,
            S::StartRecord | S::StartField => match b {
                b'"' => {
                    opened_at = at;
                    S::InQuoted
                }
                b',' => S::StartField,
                _ if terminator => S::StartRecord,
                _ => S::InField,
            },
            S::InField => match b {
                b',' => S::StartField,
                _ if terminator => S::StartRecord,
                _ => S::InField,
            },
            S::InQuoted if b == b'"' => S::QuoteInQuoted,
            S::InQuoted => S::InQuoted,
            S::QuoteInQuoted => match b {
                b'"' => S::InQuoted,
                b',' => S::StartField,
                _ if terminator => S::StartRecord,
                _ => {
                    let shown = String::from_utf8_lossy(&data[at..(at + 4).min(end)]).into_owned();
                    return Some(format!(
                        "line {}: a quoted field (opened on line {}) is closed by a quote that is \
                         followed by {shown:?}, not by a `,` or the end of the line; a quote \
                         inside a quoted field must be doubled (`\"\"`)",
                        offset_line(data, at),
                        offset_line(data, opened_at)
                    ));
                }
            },
        };
    }
    // Only the file's last record can end inside a quoted field: it runs to the end of the file.
    (state == S::InQuoted && end == data.len()).then(|| {
        format!(
            "unterminated quoted field: the quote opened on line {} is never closed, so \
             everything after it up to the end of the file would be read as one field",
            offset_line(data, opened_at)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(data: &str) -> Vec<(u64, Result<Vec<String>, String>)> {
        read_strict(data.as_bytes())
            .unwrap()
            .rows
            .into_iter()
            .map(|r| {
                let rec = r.record.map(|rec| {
                    rec.iter()
                        .map(|f| String::from_utf8_lossy(f).into_owned())
                        .collect()
                });
                (r.line, rec)
            })
            .collect()
    }

    fn fields(v: &[&str]) -> Result<Vec<String>, String> {
        Ok(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn well_formed_files_read_as_the_csv_crate_reads_them() {
        let got = rows("\u{feff}a , b\r\n1,\"x,\"\"y\"\"\ny\"\r\n\r\n2,5\" wide\n3,\"\"\n");
        assert_eq!(
            got,
            vec![
                (2, fields(&["1", "x,\"y\"\ny"])),
                (5, fields(&["2", "5\" wide"])),
                (6, fields(&["3", ""])),
            ]
        );
        let t = read_strict(b"\xef\xbb\xbf a ,b\n").unwrap();
        assert_eq!(t.headers, ["a", "b"]);
        assert!(t.rows.is_empty());
        // A closed quote at the very end of the file, no final newline.
        assert_eq!(rows("a,b\n1,\"z\""), vec![(2, fields(&["1", "z"]))]);
    }

    #[test]
    fn ragged_rows_are_errors_of_their_own_and_reading_goes_on() {
        let got = rows("a,b\n1,2,3\n4\n5,6\n");
        assert_eq!(
            got[0],
            (2, Err("the row has 3 field(s), the header 2".into()))
        );
        assert_eq!(
            got[1],
            (3, Err("the row has 1 field(s), the header 2".into()))
        );
        assert_eq!(got[2], (4, fields(&["5", "6"])));
    }

    #[test]
    fn unterminated_quote_names_the_line_it_opens_on() {
        let got = rows("a,b\r\n1,ok\r\n2,\"never closed\r\n3,x\r\n4,y\r\n");
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], (2, fields(&["1", "ok"])));
        let (line, err) = &got[1];
        assert_eq!(*line, 3);
        let err = err.as_ref().unwrap_err();
        assert!(
            err.starts_with(
                "unterminated quoted field: the quote opened on line 3 is never closed"
            ),
            "{err}"
        );
        // Also when the header row is the one left open.
        let fault = read_strict(b"a,\"b\n1,2\n").unwrap_err();
        assert_eq!(fault.line, 1);
        assert!(fault.reason.contains("opened on line 1"), "{fault:?}");
    }

    #[test]
    fn text_after_a_closing_quote_is_an_error() {
        // The stray quote inside `"say "hi"` closes the field early; the csv crate would read
        // `say hi"` and carry on silently.
        let got = rows("a,b\n1,\"say \"hi\" now\"\n2,x\n");
        let err = got[0].1.as_ref().unwrap_err();
        assert!(
            err.starts_with("line 2: a quoted field (opened on line 2)"),
            "{err}"
        );
        assert!(err.contains("\"hi\\\" \""), "{err}");
        assert_eq!(got[1], (3, fields(&["2", "x"])));
    }

    #[test]
    fn duplicate_columns_are_named() {
        let fault = read_strict(b"image,text,id,text\na,b,c,d\n").unwrap_err();
        assert_eq!(
            fault,
            CsvFault {
                line: 1,
                reason: "duplicate column `text` (columns 2 and 4 of the header)".into()
            }
        );
        // Empty header cells (pandas' index column) name nothing.
        assert!(read_strict(b",a,\n1,2,3\n").is_ok());
    }
}
