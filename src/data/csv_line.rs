//! The 1-based line a CSV record starts on, for error messages and `summary.skipped`.
//!
//! The `csv` crate's own `Position::line` is off for CRLF files (the first record after a CRLF
//! header reports line 1, and each record with a quoted newline adds one line too few), and the
//! released label files (and everything Python's `csv` module writes) use CRLF. The record's byte
//! offset is right, up to the line terminator of the previous record and any blank lines it skipped,
//! so the line is counted from the bytes themselves.

/// The line (1-based) of the record that `csv::Position::byte` `byte` points at, in `data`.
pub fn record_line(data: &[u8], byte: u64) -> u64 {
    let start = (byte as usize).min(data.len());
    let first = data[start..]
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .map_or(data.len(), |i| start + i);
    1 + data[..first].iter().filter(|&&b| b == b'\n').count() as u64
}

/// The line (1-based) that byte `offset` of `data` is on.
pub fn offset_line(data: &[u8], offset: usize) -> u64 {
    let end = offset.min(data.len());
    1 + data[..end].iter().filter(|&&b| b == b'\n').count() as u64
}

/// The line of `pos` in `data` (line 0 when the reader gave no position).
pub fn position_line(data: &[u8], pos: Option<&csv::Position>) -> u64 {
    pos.map_or(0, |p| record_line(data, p.byte()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(data: &str) -> Vec<u64> {
        let mut r = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(data.as_bytes());
        r.headers().unwrap();
        r.records()
            .map(|rec| position_line(data.as_bytes(), rec.unwrap().position()))
            .collect()
    }

    #[test]
    fn lf_crlf_quoted_newlines_and_blank_lines() {
        assert_eq!(lines("a,b\n1,2\n3,4\n"), [2, 3]);
        assert_eq!(lines("a,b\r\n1,2\r\n3,4\r\n"), [2, 3]);
        assert_eq!(lines("a,b\r\n1,\"x\n\"\r\n3,\"y\n\"\r\n5,z\r\n"), [2, 4, 6]);
        assert_eq!(lines("\u{feff}a,b\r\n\r\n1,2\r\n\n3,4"), [3, 5]);
    }
}
